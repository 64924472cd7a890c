"""The test images of the shift benchmarks: which CIFAR-10 test images a split draws (``all``, ``tuning``,
``report``), the corrupted and clean subsets written to disk, and the prepared :class:`ShiftData` a benchmark
runs on (ImageNet-C and LAION-C trees are prepared by :mod:`adaptsoup_bench.imagenet_c`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.core.evaluation import top1
from adaptsoup.core.models import class_names, load_model
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup_bench.corruptions import corrupt_batch
from adaptsoup_bench.datasets import default_stock_path
from adaptsoup_bench.shift_config import SPLITS, BenchConfig, bench_work_dir


def split_pool(labels: torch.Tensor, split: str) -> np.ndarray:
    """The test-set indices (positions in ``load_folder``'s sorted list) a split draws from.

    ``all``: every image.  ``tuning`` / ``report``: within each class, the first / second half of that
    class's images in the sorted order (CIFAR-10: 500 of each class's 1,000 test images each).  The sorted
    list is grouped by class folder, so halving it by position (index < 5,000) would put five classes in
    each half; halving every class keeps both halves class-balanced and disjoint.
    """
    labels_np = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels_np))
    if split not in ("tuning", "report"):
        raise AdaptsoupError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    keep = []
    for c in np.unique(labels_np):
        members = np.flatnonzero(labels_np == c)
        half = len(members) // 2
        keep.append(members[:half] if split == "tuning" else members[half:])
    return np.sort(np.concatenate(keep))


def _draw(pool: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices of ``pool`` drawn by ``seed``, sorted (the whole pool when it is not larger)."""
    if count >= len(pool):
        return pool
    return np.sort(pool[np.random.default_rng(seed).permutation(len(pool))[:count]])


def split_description(cfg: BenchConfig, corrupted: np.ndarray, clean: np.ndarray) -> dict:
    """What the results say about which test images served what (the ``split`` of the results JSON)."""
    return {
        "name": cfg.split,
        "tuning": "CIFAR-10 test images in the first half of each class (positions 0-499 of the class's 1,000 in load_folder's "
                  "sorted order); settings are chosen here, default severity 3",
        "report": "the second half of each class (positions 500-999); run once with the frozen recipe, default severity 5",
        "all": "every test image (the benchmark before the split; results before issue #13)",
        "used": cfg.split,
        "severity": cfg.severity,
        "corrupted": f"{len(corrupted)} test images of the {cfg.split} pool drawn with seed {cfg.seed}, each corrupted by every one "
                     f"of {len(cfg.corruptions)} corruptions; even positions = unlabeled target ({(len(corrupted) + 1) // 2} per "
                     f"corruption), odd positions = evaluation ('disjoint', {len(corrupted) // 2} per corruption)",
        "clean": f"{len(clean)} uncorrupted test images of the same pool drawn with seed {cfg.seed + 1} (clean accuracy)",
        "corrupted_indices": [int(i) for i in corrupted], "clean_indices": [int(i) for i in clean],
    }


def corrupted_indices(test: ImageSet, cfg: BenchConfig) -> np.ndarray:
    """The test indices that are corrupted (``per_corruption`` of the split's pool, seeded, sorted)."""
    return _draw(split_pool(test.labels, cfg.split), cfg.per_corruption, cfg.seed)


def clean_indices(test: ImageSet, cfg: BenchConfig) -> np.ndarray:
    """The test indices of the clean-accuracy subset (``clean_images`` of the split's pool, seed + 1)."""
    return _draw(split_pool(test.labels, cfg.split), cfg.clean_images, cfg.seed + 1)


def prepare_corrupted(test: ImageSet, names: list[str], cfg: BenchConfig, root: Path, progress=None) -> Path:
    """Write each corruption's selected test images as PNGs: ``root/{even,odd}/<corruption>/<class>/<index>.png``.

    The selection is a fixed seeded subset of ``per_corruption`` test images of the split's pool (all of
    them when it is the whole pool), in sorted order; position parity gives the even (target) / odd
    (evaluation) split.
    """
    from PIL import Image

    progress = progress or NullProgress()
    chosen = corrupted_indices(test, cfg)
    count = len(chosen)
    task = progress.add_task(f"corrupt (severity {cfg.severity})", total=len(cfg.corruptions))
    for corruption in cfg.corruptions:
        marker = root / f".{corruption}.done"
        if marker.is_file():
            progress.advance(task)
            continue
        images = test.images[torch.as_tensor(chosen)].permute(0, 2, 3, 1).numpy()
        corrupted = corrupt_batch(images, corruption, cfg.severity, indices=chosen)
        for pos, (img, idx) in enumerate(zip(corrupted, chosen)):
            split = "even" if pos % 2 == 0 else "odd"
            label = names[int(test.labels[idx])]
            path = root / split / corruption / label / f"{int(idx):05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, format="PNG")
        marker.write_text(str(count))
        progress.advance(task)
    progress.remove_task(task)
    return root


@dataclass
class ShiftData:
    """A prepared shift benchmark: where the target is, what to evaluate on, and how to score."""

    benchmark: str
    stock: Path
    decoder: str | None
    source: str
    target: Path  # the pooled even (unlabeled) images
    corruptions: list[str]
    evals: dict[str, ImageSet]  # "clean" (optional), "odd/<corruption>", "even/<corruption>"
    preprocess: Preprocess
    score: Callable[[torch.Tensor, torch.Tensor], float] = top1
    notes: dict = field(default_factory=dict)
    chance: float | None = None  # accuracy (%) of guessing, for the sanity check; None where not defined
    to_labels: Callable[[torch.Tensor], torch.Tensor] | None = None  # logits to the scored label space (LAION-C: superclasses)


def prepare_c10c(cfg: BenchConfig, *, progress=None, log: Callable[[str], None] = print) -> ShiftData:
    """The CIFAR-10-C shift of ``cfg`` (corrupted test subsets, even/odd split, clean subset) on disk and decoded."""
    from adaptsoup_bench.datasets import require_cifar10

    progress = progress or NullProgress()
    stock_path, decoder = _stock_and_decoder(cfg)
    cifar = require_cifar10(cfg.data)
    work = bench_work_dir(cfg, "c10c")
    stock = load_model(None, stock_path)
    pre = Preprocess.for_model(stock)
    names = class_names(stock)
    t0 = time.perf_counter()
    test = load_folder(cifar / "test", pre, labeled=True, class_names=names, progress=progress, description="decode test")
    corrupted_root = prepare_corrupted(test, names, cfg, work / "data" / f"n{cfg.per_corruption}-seed{cfg.seed}", progress)
    clean_dir = _clean_subset(test, names, cfg, work / "data" / f"clean-n{cfg.clean_images}-seed{cfg.seed}")
    evals = {"clean": load_folder(clean_dir, pre, labeled=True, class_names=names)}
    for c in cfg.corruptions:
        for split in ("odd", "even"):
            evals[f"{split}/{c}"] = load_folder(corrupted_root / split / c, pre, labeled=True, class_names=names)
    split = split_description(cfg, corrupted_indices(test, cfg), clean_indices(test, cfg))
    log(f"data: {len(cfg.corruptions)} corruptions x {len(split['corrupted_indices'])} test images of split {cfg.split!r} "
        f"(severity {cfg.severity}) at {corrupted_root}")
    return ShiftData("c10c", stock_path, decoder, str(cifar / "train"), corrupted_root / "even", list(cfg.corruptions), evals, pre,
                     notes={"prepare_data_s": round(time.perf_counter() - t0, 1), "split": split}, chance=100.0 / len(names))


def _stock_and_decoder(cfg: BenchConfig) -> tuple[Path, str | None]:
    stock_path = Path(cfg.stock or default_stock_path())
    if not stock_path.is_file():
        raise AdaptsoupError(f"reference stock not found: {stock_path} (train it with `make stock`, or pass --stock)")
    decoder = cfg.decoder
    if decoder is None:
        candidate = stock_path.with_name(stock_path.stem + "_mae_decoder.safetensors")
        decoder = str(candidate) if candidate.is_file() else None
    return stock_path, decoder


def _clean_subset(test: ImageSet, names: list[str], cfg: BenchConfig, root: Path) -> Path:
    from PIL import Image

    marker = root / ".done"
    if marker.is_file():
        return root
    chosen = clean_indices(test, cfg)
    n = len(chosen)
    for idx in chosen:
        path = root / names[int(test.labels[idx])] / f"{int(idx):05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[int(idx)].permute(1, 2, 0).numpy()).save(path, format="PNG")
    marker.write_text(str(n))
    return root
