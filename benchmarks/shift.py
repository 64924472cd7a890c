"""The CIFAR-10 → CIFAR-10-C benchmark: the paper's Table 1 and Table 2 at CPU scale.

Protocol (Self-Soupervision §4): the test images of each corruption are split by position — even-indexed
images are the unlabeled target the ingredients are inter-trained on, odd-indexed images are the
evaluation data ("disjoint"); "joint" evaluates on the even images themselves.  The target is the pool of
all corruptions' even images.  Rows:

* ``deployed`` — the stock as is;
* ``supervised_soup`` — the stock fine-tuned N times on source (no inter-training), uniform soup;
* ``cont_ssl_soup`` — MAE inter-training on the *source* images, then the same fine-tunings;
* ``self_soup_target`` — MAE inter-training on the target, fine-tuned back, uniform soup;
* ``self_soup_target_best_ingredient`` — its best ingredient, chosen on the evaluation images (an oracle
  upper bound for picking one ingredient, not a method);
* ``self_soup_target_self_seasoned`` — its ingredients mixed by Self-Seasoning on the target images;
* ``self_soup_target_self_seasoned_centered`` — the same with the embeddings centred per batch before the
  cosines (``mix --center``; not in the paper — see :func:`adaptsoup.soup.knn.knn_entropy`);
* ``supervised_soup+sar`` and ``self_soup_target+sar`` — SAR over each corruption's odd images, online,
  reset between corruptions (Table 2), at the paper's learning rate for soups (base 5e-5 per 64 images);
  each corruption's record counts the samples filtered at each forward, the updates made and the resets.

* ``self_plus_supervised_soup`` — the uniform soup of the Self-Soup's and the supervised soup's ingredients
  together (eq. 1 of the paper allows both kinds);
* ``self_plus_deployed_soup`` — the Self-Soup's ingredients and the deployed model, uniform (under the
  ``pretrained`` protocol the deployed model is one more fine-tune of the same pre-trained encoder).

Protocols (``protocol``): ``deployed`` inter-trains and fine-tunes the deployed model itself; ``pretrained``
(the paper's) makes every row's ingredients, supervised ones included, from the pre-trained stock (the MAE
phase of the deployed model, ``*_mae.safetensors``) with the same LP-FT budget; the ``deployed`` row stays the
deployed model.  Splits (``split``): ``tuning`` and ``report`` are the two halves of the CIFAR-10 test set
(:func:`split_pool`): settings are chosen on ``tuning`` and the frozen recipe is run once on ``report``.
Paired 95% bootstrap intervals over the evaluation images (:func:`paired_bootstrap`) compare the rows.

No choice (learning rates, steps, seeds) is made on the odd images: the recipe is fixed before the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adaptsoup.core.evaluation import evaluate_checkpoints
from adaptsoup.pipeline.adapt import AdaptResult, run_adapt
from adaptsoup.pipeline.soups import write_soup
from adaptsoup_bench.corruptions import CORRUPTIONS, corrupt_batch
from adaptsoup.core.data import ImageSet, Preprocess, default_cache_dir, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.io import atomic_path, write_atomic, write_json_atomic, write_text_atomic
from adaptsoup.core.manifest import config_tag, environment, file_digest, provenance_lines, source_state
from adaptsoup.soup.run import MixRequest, mix_run
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.run_dir import RunDir
from adaptsoup.core.models import class_names, load_model, model_meta
from adaptsoup.soup.average import stream_weighted_average
from adaptsoup.soup.task_vector import onto_deployed
from adaptsoup_bench.datasets import default_stock_path
from adaptsoup.core.evaluation import top1
from adaptsoup.core.progress import NullProgress
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig, with_overrides
from adaptsoup.soup.methods.self_season import SelfSeasonOptions, self_season_summary
from adaptsoup.tta.adapter import TTAConfig
from adaptsoup.tta.stream import run_tta

TITLES = {"c10c": "CIFAR-10 → CIFAR-10-C", "imagenet-c": "ImageNet → ImageNet-C", "laion-c": "ImageNet → LAION-C"}
ROW_NAMES = (
    "deployed", "supervised_soup", "cont_ssl_soup", "self_soup_target", "self_soup_target_best_ingredient",
    "self_soup_target_self_seasoned", "self_soup_target_self_seasoned_centered", "self_plus_supervised_soup", "self_plus_deployed_soup",
    "supervised_soup+sar", "self_soup_target+sar",
    "supervised_soup+sar_reference_lr", "self_soup_target+sar_reference_lr",
)
PRETRAINED_ROWS = ("self_task_vector_soup", "cont_ssl_task_vector_soup")  # rows of the pretrained protocol alone, after the self_plus ones
SAR_ROWS = {"+sar": "sar_base_lr", "+sar_reference_lr": "sar_reference_base_lr"}  # row suffix -> the config's base lr
CENTERED = "self-season-centered"  # Self-Seasoning on batch-centred embeddings (``--center``), beside the paper's
PROTOCOLS = ("deployed", "pretrained")
SPLITS = ("all", "tuning", "report")
SPLIT_SEVERITY = {"all": 5, "tuning": 3, "report": 5}  # default severity of each split
# the paired comparisons the results report (row minus row), each on the odd images and on clean images
PAIRS = (
    ("self_soup_target", "supervised_soup"), ("self_soup_target", "deployed"),
    ("self_plus_supervised_soup", "supervised_soup"), ("self_plus_supervised_soup", "deployed"),
    ("self_soup_target_self_seasoned", "supervised_soup"), ("cont_ssl_soup", "supervised_soup"),
    ("supervised_soup", "deployed"), ("self_plus_deployed_soup", "deployed"),
    ("self_task_vector_soup", "deployed"), ("self_task_vector_soup", "supervised_soup"),
    ("cont_ssl_task_vector_soup", "deployed"), ("self_task_vector_soup", "cont_ssl_task_vector_soup"),
)


@dataclass
class BenchConfig:
    mode: str = "quick"
    severity: int = 5
    stock: str = ""
    decoder: str | None = None
    data: str | None = None
    out: str = ""
    work: str = ""
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    per_corruption: int = 300  # test images per corruption (half even, half odd)
    clean_images: int = 1000
    source_images: int = 5000
    # MAE inter-training learning rates: the paper's grid (1e-5 … 4e-5, also ``adapt``'s default). Ten times
    # that (this grid until commit 71736fe) drags the fine-tuned encoder back toward MAE features: after 1,000
    # steps the linear probe's *source* training accuracy fell from the stock's 82.1% to 62.9–65.7%, against
    # 68.7–75.9% at the paper's rates (README, Benchmarks).
    inter_lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-5])
    inter_steps: int = 200
    ft_lrs: list[float] = field(default_factory=lambda: [1e-4, 2e-4])
    ft_steps: int = 60
    vanilla: int = 2
    batch_size: int = 64
    self_season_epochs: int = 3
    self_season_subset: int = 2048
    sar_batch: int = 64
    sar_base_lr: float | None = 5e-5  # per 64 images: the paper's best for SAR on soups (5e-5 at batch 128, scaled)
    # a second, fixed SAR setting reported beside it (rows ``+sar_reference_lr``): SAR's official ViT learning
    # rate, 1e-3 per 64 images; None leaves those rows out. Neither is chosen on the evaluation images.
    sar_reference_base_lr: float | None = 1e-3
    decoder_warmup_loaded: bool = False  # warm up the stock's MAE decoder (encoder frozen) before inter-training
    seed: int = 0
    bf16: bool = True
    device: str = "cpu"
    label: str = ""  # appended to the results' file names (c10c_quick_s5_<label>.json) to keep variants apart
    # -- added for issue #13; at their defaults they leave the work folders' digests as they were -------------
    protocol: str = "deployed"  # "deployed" or "pretrained" (every ingredient from the pre-trained stock)
    pretrained: str = ""  # the pre-trained stock (default: the stock's *_mae.safetensors beside it)
    split: str = "all"  # "all" test images, or the "tuning" / "report" half (see split_pool)
    cont_ssl: bool = True  # the continued-SSL soup row (False: left out, to save its inter-training)
    centered: bool = True  # the centred Self-Seasoning row
    sar: bool = True  # the SAR rows (Table 2)
    joint: bool = True  # evaluate the rows on the even (target) images too ("joint"); False saves that evaluation
    bootstrap_resamples: int = 10000
    # pretrained protocol: the row self_task_vector_soup = deployed + scale · mean_k(inter-trained_k − pretrained),
    # the label-free task-arithmetic shortcut for fine-tuning back (adaptsoup.soup.task_vector); no training of its own
    task_vector_scale: float = 1.0

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "BenchConfig":
        if mode == "quick":
            cfg = cls(mode="quick")
        elif mode == "full":
            cfg = cls(mode="full", per_corruption=2000, clean_images=10000, source_images=20000, inter_lrs=[1e-5, 2e-5, 3e-5, 4e-5],
                      inter_steps=1000, ft_lrs=[1e-4, 2e-4], ft_steps=300, vanilla=4, self_season_epochs=5, self_season_subset=4096)
        else:
            raise AdaptsoupError(f"--mode must be quick or full, got {mode!r}")
        overrides = dict(overrides)
        split = overrides.get("split") or cfg.split
        if split not in SPLITS:
            raise AdaptsoupError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
        if overrides.get("severity") is None:
            overrides["severity"] = SPLIT_SEVERITY[split]
        cfg = with_overrides(cfg, overrides)
        if cfg.protocol not in PROTOCOLS:
            raise AdaptsoupError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
        return cfg


EVALUATION_ONLY = ("cont_ssl", "centered", "sar", "joint", "bootstrap_resamples", "task_vector_scale")  # choose rows, shape no data and no run
NEW_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BenchConfig)
                if f.name in ("protocol", "pretrained", "split", *EVALUATION_ONLY)}


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



# --------------------------------------------------------------------------------------------------------------
# Data


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


# --------------------------------------------------------------------------------------------------------------
# The benchmark


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


def run_c10c(cfg: BenchConfig, *, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """CIFAR-10 → CIFAR-10-C: generate the corrupted test images, then :func:`run_shift_benchmark`."""
    results_stem("c10c", cfg)  # a bad --label fails before the images are made
    data = prepare_c10c(cfg, progress=progress, log=log)
    return run_shift_benchmark(data, cfg, command=command, progress=progress, log=log)


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


def inter_encoders(run_dir: Path) -> list[Path]:
    """The inter-trained encoders the self ingredients of an adapt run were fine-tuned from (its manifest's
    ingredient records name them; an encoder reused from an earlier configuration has no ``inter`` record)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    names = sorted({rec["inter"] for rec in manifest["ingredients"].values() if rec.get("inter")})
    return [RunDir(run_dir).inter(name) for name in names]


def write_task_vector_soup(out: Path, deployed: Path, pretrained: Path, encoders: list[Path], scale: float) -> Path:
    """deployed + scale · (mean of the inter-trained ``encoders`` − the pre-trained stock), deployed head and metadata."""
    model = load_model(None, deployed)
    mean, _ = stream_weighted_average(encoders)
    state = onto_deployed(model, pretrained, mean, scale)
    meta = model_meta(model, made_by="adaptsoup bench", stage="soup", method="task-vector", scale=scale,
                      parents=[deployed.name, pretrained.name, *(p.name for p in encoders)])
    return save_checkpoint(out, state, meta)


def pretrained_path(cfg: BenchConfig) -> Path | None:
    """The pre-trained stock of the ``pretrained`` protocol (None under ``deployed``); it must exist."""
    if cfg.protocol != "pretrained":
        return None
    stock = Path(cfg.stock or default_stock_path())
    path = Path(cfg.pretrained) if cfg.pretrained else stock.with_name(stock.stem + "_mae.safetensors")
    if not path.is_file():
        raise AdaptsoupError(f"pre-trained stock not found: {path} (the MAE phase of the deployed model; pass --set pretrained=PATH)")
    return path


def results_stem(benchmark: str, cfg: BenchConfig) -> str:
    """``<benchmark>_<mode>_s<severity>[_<label>]``: the results' file names."""
    if cfg.label and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.label):
        raise AdaptsoupError(f"--label must be letters, digits, '.', '_' or '-', got {cfg.label!r}")
    return f"{benchmark}_{cfg.mode}_s{cfg.severity}" + (f"_{cfg.label}" if cfg.label else "")


def bench_work_dir(cfg: BenchConfig, benchmark: str, *extra) -> Path:
    """Where a benchmark keeps its generated data and runs: ``<--work or the cache>/<benchmark>-<mode>-s<severity>-<tag>``.

    The tag digests every setting that shapes the data and the runs (``cfg`` but its output folders, the
    stock's contents, and ``extra`` settings), so a rerun with the same ones resumes there and a run with
    any other never reuses its images or ingredients.
    """
    stock = Path(cfg.stock or default_stock_path())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "work", "label", *EVALUATION_ONLY) and not (k in NEW_DEFAULTS and v == NEW_DEFAULTS[k])}
    pretrained = pretrained_path(cfg)
    if pretrained is not None:
        extra = (*extra, file_digest(pretrained))
    tag = config_tag(settings, file_digest(stock) if stock.is_file() else str(stock), *extra)
    work = Path(cfg.work or default_cache_dir() / "bench") / f"{benchmark}-{cfg.mode}-s{cfg.severity}-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    return work


# settings that shape an inter-trained encoder (and its linear probe) / a vanilla ingredient; runs of two
# benchmark configurations that agree on them share those files (:func:`share_trained`)
INTER_SETTINGS = ("mode", "severity", "stock", "decoder", "data", "corruptions", "per_corruption", "source_images", "inter_lrs",
                  "inter_steps", "batch_size", "decoder_warmup_loaded", "seed", "bf16", "device", "protocol", "pretrained", "split")
VANILLA_SETTINGS = ("stock", "data", "source_images", "ft_lrs", "ft_steps", "vanilla", "batch_size", "seed", "bf16", "device",
                    "protocol", "pretrained")


def shared_dir(cfg: BenchConfig, benchmark: str, kind: str, keys: tuple[str, ...], *extra) -> Path:
    """A folder of trained files shared by every configuration that agrees on ``keys`` (and the stocks' contents)."""
    stock = Path(cfg.stock or default_stock_path())
    pretrained = pretrained_path(cfg)
    settings = {k: getattr(cfg, k) for k in keys}
    tag = config_tag(settings, file_digest(stock) if stock.is_file() else str(stock),
                     file_digest(pretrained) if pretrained else None, kind, *extra)
    return Path(cfg.work or default_cache_dir() / "bench") / "shared" / f"{benchmark}-{kind}-{tag}"


def share_trained(run_dir: Path, shared: Path, patterns: tuple[str, ...], *, collect: bool) -> list[str]:
    """Link the files of ``shared`` matching ``patterns`` into ``run_dir`` where missing (``collect=False``,
    before a run: ``adapt`` then skips training them), or the run's into ``shared`` (``collect=True``, after)."""
    src, dst = (run_dir, shared) if collect else (shared, run_dir)
    linked = []
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            target = dst / path.relative_to(src)
            if target.exists() or not path.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                with atomic_path(target) as tmp:
                    shutil.copy2(path, tmp)
            linked.append(str(path.relative_to(src)))
    return linked


def run_shift_benchmark(data: ShiftData, cfg: BenchConfig, *, command: str = "", progress=None,
                        log: Callable[[str], None] = print) -> dict:
    """The paper's rows on a prepared shift: adapt runs, Self-Seasoning, evaluation, SAR, tables and plots."""
    if cfg.vanilla < 1 or not cfg.inter_lrs or not cfg.ft_lrs:
        raise AdaptsoupError("the benchmark's rows need vanilla >= 1 (the supervised soup) and at least one inter-training "
                             "and one fine-tuning learning rate")
    stem = results_stem(data.benchmark, cfg)  # a bad --label fails here, not after the run
    t_start, source = time.perf_counter(), source_state()
    timings: dict[str, float] = {"prepare_data": data.notes["prepare_data_s"]} if "prepare_data_s" in data.notes else {}
    progress = progress or NullProgress()
    work = bench_work_dir(cfg, data.benchmark)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = pretrained_path(cfg)
    # validation_holdout 0: every source image fine-tunes, as in the committed results (benchmarks/decision.py
    # makes the label-free estimates on its own validation images)
    common = dict(model=str(data.stock), source=data.source, stock=data.decoder, max_source_images=cfg.source_images, validation_holdout=0,
                  seed=cfg.seed, device=cfg.device, precision="bf16" if cfg.bf16 else "fp32", pretrained=str(pretrained) if pretrained else None)
    inter = InterTrainConfig(lrs=list(cfg.inter_lrs), steps=[cfg.inter_steps], batch_size=cfg.batch_size,
                             decoder_warmup_loaded=cfg.decoder_warmup_loaded)
    ft = FineTuneConfig(lrs=list(cfg.ft_lrs), steps=cfg.ft_steps, batch_size=cfg.batch_size)
    log(f"protocol {cfg.protocol}: " + (f"every ingredient from the pre-trained stock {pretrained}" if pretrained
                                        else f"every ingredient from the deployed model {data.stock}"))

    def adapt(kind: str, **changes) -> "AdaptResult":
        run_dir = work / "runs" / kind
        # the target is named by the settings that make it (and, for released layouts, their root), not by its path,
        # which lies in this configuration's own work folder
        inter_shared = shared_dir(cfg, data.benchmark, f"inter-{kind}", INTER_SETTINGS, data.notes.get("root", ""))
        vanilla_shared = shared_dir(cfg, data.benchmark, "vanilla", VANILLA_SETTINGS)
        inter_files = ("inter/mae*.safetensors",)
        vanilla_files = ("ingredients/vanilla-*.safetensors", "inter/stock.probe.safetensors", "inter/pretrained.probe.safetensors")
        if not changes.get("vanilla"):
            vanilla_files = ()
        reused = share_trained(run_dir, inter_shared, inter_files, collect=False) + share_trained(run_dir, vanilla_shared, vanilla_files, collect=False)
        if reused:
            log(f"{kind}: reusing {len(reused)} trained file(s) of an earlier configuration that agrees on their settings: {', '.join(reused)}")
        res = run_adapt(AdaptConfig(target=str(data.target), out=str(run_dir), **{**common, **changes}), progress=progress, echo=log, command=command)
        share_trained(run_dir, inter_shared, inter_files, collect=True)
        share_trained(run_dir, vanilla_shared, vanilla_files, collect=True)
        return res

    t0 = time.perf_counter()
    self_run = adapt("self", vanilla=cfg.vanilla, inter=inter, finetune=ft)
    timings["adapt_self_and_supervised"] = time.perf_counter() - t0
    cont = None
    if cfg.cont_ssl:
        t0 = time.perf_counter()
        cont = adapt("cont_ssl", vanilla=0, inter=dataclasses.replace(inter, data="source"), finetune=ft)
        timings["adapt_cont_ssl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    season_options = SelfSeasonOptions(epochs=cfg.self_season_epochs, subset=cfg.self_season_subset, seed=cfg.seed, bf16=cfg.bf16)
    mixes = mix_run(MixRequest(run_dir=self_run.run_dir, methods=["self-season"], evals=[], options={"self-season": season_options},
                               device=cfg.device), progress=progress, log=log)
    timings["self_season"] = time.perf_counter() - t0
    if cfg.centered:
        t0 = time.perf_counter()
        mixes = mix_run(MixRequest(run_dir=self_run.run_dir, methods=["self-season"], evals=[], save_as=CENTERED,
                                   options={"self-season": dataclasses.replace(season_options, center=True)}, device=cfg.device),
                        progress=progress, log=log)
        timings["self_season_centered"] = time.perf_counter() - t0

    # -- evaluation of every checkpoint on clean, odd (disjoint) and even (joint) images -------------------------
    t0 = time.perf_counter()
    evals = data.evals if cfg.joint else {k: v for k, v in data.evals.items() if not k.startswith("even/")}
    ingredients = {p.stem: p for p in self_run.ingredients if not p.stem.startswith("vanilla")}
    vanillas = [p for p in self_run.ingredients if p.stem.startswith("vanilla")]
    stock_model = load_model(None, data.stock)
    soups = {
        "deployed": data.stock, "supervised_soup": self_run.supervised_soup_path,
        **({"cont_ssl_soup": cont.soup_path} if cont is not None else {}),
        "self_soup_target": self_run.soup_path, "self_soup_target_self_seasoned": self_run.run_dir / mixes["self-season"]["path"],
        **({"self_soup_target_self_seasoned_centered": self_run.run_dir / mixes[CENTERED]["path"]} if cfg.centered else {}),
        "self_plus_supervised_soup": write_soup(self_run.run_dir / "soups" / "self_plus_supervised_soup.safetensors",
                                                list(ingredients.values()) + vanillas, stock_model),
        "self_plus_deployed_soup": write_soup(self_run.run_dir / "soups" / "self_plus_deployed_soup.safetensors",
                                              list(ingredients.values()) + [Path(data.stock)], stock_model),
    }
    if pretrained is not None:
        soups["self_task_vector_soup"] = write_task_vector_soup(self_run.run_dir / "soups" / "self_task_vector_soup.safetensors",
                                                                data.stock, pretrained, inter_encoders(self_run.run_dir),
                                                                cfg.task_vector_scale)
        if cont is not None:  # the control: the task vector of MAE on the *source* images, onto the deployed model
            soups["cont_ssl_task_vector_soup"] = write_task_vector_soup(cont.run_dir / "soups" / "cont_ssl_task_vector_soup.safetensors",
                                                                        data.stock, pretrained, inter_encoders(cont.run_dir),
                                                                        cfg.task_vector_scale)
    del stock_model
    candidates = {**soups, **{f"ingredient:{k}": v for k, v in ingredients.items()}}
    predictions: dict[str, dict[str, torch.Tensor]] = {}
    evaluate = functools.partial(evaluate_checkpoints, pre=data.preprocess, device=cfg.device, bf16=False, progress=progress, score=data.score,
                                 predictions=predictions)
    # the rows on every set; the ingredients on clean and disjoint only (their joint accuracy is in no table)
    metrics = evaluate(soups, evals)
    metrics = evaluate(candidates, {k: v for k, v in evals.items() if not k.startswith("even/")}, known=metrics)
    corruptions = data.corruptions
    best = max(ingredients, key=lambda k: mean_or_nan(metrics[f"odd/{c}"][f"ingredient:{k}"] for c in corruptions))
    metrics = evaluate({f"ingredient:{best}": ingredients[best]}, evals, known=metrics)
    timings["evaluate"] = time.perf_counter() - t0
    has_clean = "clean" in evals
    # per-image correctness where the score is top-1 (LAION-C's superclass scoring is not per-image top-1 here)
    correct = per_image_correct(predictions, evals, list(soups), corruptions) if data.score is top1 else {"disjoint": {}, "clean": {}}
    predictions_path = save_correct(work / f"correct_{cfg.protocol}.npz", correct)
    t0 = time.perf_counter()
    paired = paired_comparisons(correct, PAIRS, resamples=cfg.bootstrap_resamples, seed=cfg.seed, clusters=image_ids(evals, corruptions))
    timings["bootstrap"] = time.perf_counter() - t0

    def row(name: str, key: str) -> dict:
        return score_row(name, key, metrics, corruptions)

    rows = [row(n, n) for n in ("deployed", "supervised_soup", "cont_ssl_soup", "self_soup_target") if n in soups]
    rows.append({**row("self_soup_target_best_ingredient", f"ingredient:{best}"), "ingredient": best,
                 "note": "chosen by its mean accuracy on the odd images: an oracle, not a method"})
    for name, key in (("self_soup_target_self_seasoned", "self-season"), ("self_soup_target_self_seasoned_centered", CENTERED)):
        if name in soups:
            rows.append({**row(name, name), "coefficients": mixes[key]["coefficients"],
                         "self_season": self_season_summary(mixes[key]["info"])})
    rows.append({**row("self_plus_supervised_soup", "self_plus_supervised_soup"), "ingredients": len(ingredients) + len(vanillas)})
    rows.append({**row("self_plus_deployed_soup", "self_plus_deployed_soup"), "ingredients": len(ingredients) + 1})
    if "self_task_vector_soup" in soups:
        rows.append({**row("self_task_vector_soup", "self_task_vector_soup"), "task_vector_scale": cfg.task_vector_scale,
                     "note": "deployed + scale x (mean inter-trained encoder - pre-trained stock): no fine-tuning back"})
    if "cont_ssl_task_vector_soup" in soups:
        rows.append({**row("cont_ssl_task_vector_soup", "cont_ssl_task_vector_soup"), "task_vector_scale": cfg.task_vector_scale,
                     "note": "the control: the same with MAE inter-training on the source images instead of the target"})
    candidates = soups

    # -- SAR on the soups (Table 2): online over each corruption's odd images, reset between corruptions ---------
    t0 = time.perf_counter()
    sar_settings = [(suffix, getattr(cfg, key)) for suffix, key in SAR_ROWS.items()
                    if cfg.sar and (suffix == "+sar" or getattr(cfg, key) is not None)]
    for suffix, base_lr in sar_settings:
        for base in ("supervised_soup", "self_soup_target"):
            tta = TTAConfig(method="sar", batch_size=cfg.sar_batch, base_lr=base_lr, seed=cfg.seed, device=cfg.device)
            per, details = sar_per_corruption(candidates[base], {c: evals[f"odd/{c}"] for c in corruptions}, data, tta)
            rows.append({"name": f"{base}{suffix}", "clean": None, "disjoint": mean_or_nan(per.values()), "joint": None,
                         "per_corruption": per, "base": base, "sar_base_lr": base_lr, "sar_lr": tta.lr(), "sar": details})
    timings["sar"] = time.perf_counter() - t0

    season = mixes["self-season"]
    self_season_cost = {"wall_s": season["wall_s"], "ingredients": len(season["ingredients"]),
                        "stacked_mb": round(season["info"]["stacked_bytes"] / 2**20, 1), **season["memory"],
                        "epochs": cfg.self_season_epochs, "subset": cfg.self_season_subset}
    ingredient_scores = {k: {"clean": metrics["clean"][f"ingredient:{k}"] if has_clean else None,
                             "disjoint": mean_or_nan(metrics[f"odd/{c}"][f"ingredient:{k}"] for c in corruptions)} for k in ingredients}
    env = environment()
    result = {
        "benchmark": data.benchmark, "mode": cfg.mode, "severity": cfg.severity, "command": command, "commit": source["commit"], "source_dirty": source["dirty"],
        "machine": {k: v for k, v in env.items() if k != "packages"}, "packages": env["packages"],
        "wall_time_s": round(time.perf_counter() - t_start + data.notes.get("prepare_data_s", 0.0), 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "stock": {"path": str(data.stock), "clean_acc": metrics["clean"]["deployed"] if has_clean else None},
        "config": dataclasses.asdict(cfg),
        "data": {"corruptions": corruptions, "eval_images": {k: len(v) for k, v in evals.items()},
                 "target_images": sum(len(data.evals[f"even/{c}"]) for c in corruptions),
                 **{k: v for k, v in data.notes.items() if not k.endswith("_s") and k != "split"}},
        "protocol": cfg.protocol, "pretrained": str(pretrained) if pretrained else None,
        "split": data.notes.get("split", {"name": "all", "used": "all"}),
        "steps": {"inter": cfg.inter_steps, "fine_tune": cfg.ft_steps, "batch_size": cfg.batch_size,
                  "ingredients": {"self": len(ingredients), "vanilla": len(vanillas)}},
        "rows": rows, "paired": paired, "ingredients": ingredient_scores, "self_season_cost": self_season_cost,
        "checks": sanity_checks(rows, chance=data.chance),
        "runs": {"self": str(self_run.run_dir), "cont_ssl": str(cont.run_dir) if cont is not None else None},
        "per_image_correct": str(predictions_path),
    }
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", markdown_table(result))
    plot_results(result, out / f"{stem}_per_corruption.png", out / f"{stem}_soups_vs_ingredients.png")
    log(f"wrote {out / stem}.json, .md and plots in {result['wall_time_s']:.0f}s")
    return result


# --------------------------------------------------------------------------------------------------------------
# Paired comparisons


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0, chunk: int = 250,
                     clusters: np.ndarray | None = None) -> dict:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, in percentage points, with a 95% percentile
    bootstrap interval (``resamples`` seeded resamples; the difference of the resampled means each time).

    ``a`` and ``b`` are per-image correctness (bool or 0/1) of the two models on the same images in the same
    order.  ``clusters`` (one id per image) resamples whole clusters instead of single images: the disjoint
    set holds each test image once per corruption, and a hard image is hard under every corruption, so the
    images of one test image are not independent draws; resampling test images keeps that correlation in
    the interval (an image-level bootstrap would make it too narrow)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise AdaptsoupError(f"paired bootstrap needs two equally long, non-empty 1-D arrays, got {a.shape} and {b.shape}")
    diff = (a - b) * 100.0
    ids = np.arange(len(diff)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    sums, counts = np.bincount(ids, weights=diff), np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        draw = rng.integers(0, len(sums), size=(k, len(sums)))
        means[start:start + k] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(lo), float(hi)], "images": int(len(diff)), "clusters": int(len(sums)),
            "resamples": int(resamples)}


def image_ids(evals: dict[str, ImageSet], corruptions: list[str]) -> dict[str, np.ndarray]:
    """The test image behind each evaluated image, in :func:`per_image_correct`'s order: the file stem (the
    corrupted images are saved as ``<test index>.png``), so one test image under 15 corruptions is one cluster."""
    def stems(images: ImageSet) -> list[str]:
        return [Path(p).stem for p in images.paths]

    out = {"disjoint": np.asarray(sum((stems(evals[f"odd/{c}"]) for c in corruptions), []))}
    if "clean" in evals:
        out["clean"] = np.asarray(stems(evals["clean"]))
    return out


def per_image_correct(predictions: dict[str, dict[str, torch.Tensor]], evals: dict[str, ImageSet], names: list[str],
                      corruptions: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per-image correctness of the rows ``names``: ``{"disjoint": {name: bool [N]}, "clean": {...}}``, the
    disjoint images pooled over corruptions (odd images, corruption by corruption, in folder order)."""
    out: dict[str, dict[str, np.ndarray]] = {"disjoint": {}, "clean": {}}
    for name in names:
        if all(name in predictions.get(f"odd/{c}", {}) for c in corruptions):
            out["disjoint"][name] = np.concatenate([(predictions[f"odd/{c}"][name] == evals[f"odd/{c}"].labels).numpy() for c in corruptions])
        if "clean" in evals and name in predictions.get("clean", {}):
            out["clean"][name] = (predictions["clean"][name] == evals["clean"].labels).numpy()
    return out


def save_correct(path: Path, correct: dict[str, dict[str, np.ndarray]]) -> Path:
    """The per-image correctness as ``.npz`` (keys ``<set>/<row>``), for re-rendering the comparisons later."""
    arrays = {f"{where}/{name}": v.astype(np.uint8) for where, rows in correct.items() for name, v in rows.items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    return Path(write_atomic(path, write))


def load_correct(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of :func:`save_correct`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as blob:
        for key in blob.files:
            where, name = key.split("/", 1)
            out.setdefault(where, {})[name] = blob[key].astype(bool)
    return out


def paired_from_work(result: dict) -> dict:
    """A finished c10c result's paired comparisons recomputed from its work folder (the per-image correctness
    and the generated images' names), bootstrapped over test images: for results written before the bootstrap
    resampled test images rather than evaluation images."""
    from adaptsoup.core.data import scan_labeled

    cfg = result["config"]
    work = Path(result["runs"]["self"]).parent.parent
    correct = load_correct(work / f"correct_{result['protocol']}.npz")
    corrupted = work / "data" / f"n{cfg['per_corruption']}-seed{cfg['seed']}" / "odd"
    stems = {"disjoint": [p.stem for c in result["data"]["corruptions"] for p in scan_labeled(corrupted / c)[0]]}
    clean = work / "data" / f"clean-n{cfg['clean_images']}-seed{cfg['seed']}"
    if clean.is_dir():
        stems["clean"] = [p.stem for p in scan_labeled(clean)[0]]
    clusters = {where: np.asarray(ids) for where, ids in stems.items()}
    return paired_comparisons(correct, PAIRS, resamples=cfg.get("bootstrap_resamples", 10000), seed=cfg["seed"], clusters=clusters)


def paired_comparisons(correct: dict[str, dict[str, np.ndarray]], pairs=PAIRS, resamples: int = 10000, seed: int = 0,
                       clusters: dict[str, np.ndarray] | None = None) -> dict:
    """``{"<a>-<b>": {"disjoint": paired_bootstrap(...), "clean": ...}}`` for each pair whose rows were evaluated;
    ``clusters[set]`` (from :func:`image_ids`) makes it a bootstrap over test images."""
    clusters = clusters or {}
    out: dict = {}
    for a, b in pairs:
        entry = {where: paired_bootstrap(rows[a], rows[b], resamples, seed, clusters=clusters.get(where))
                 for where, rows in correct.items() if a in rows and b in rows}
        if entry:
            out[f"{a}-{b}"] = entry
    return out


def sar_per_corruption(checkpoint: Path, streams: dict[str, ImageSet], data: ShiftData, tta: TTAConfig) -> tuple[dict, dict]:
    """SAR online over each corruption's stream, restarting from the checkpoint for every corruption (as the
    reference does per corruption): the accuracy of the predictions made before each update, and what SAR did."""
    model = load_model(None, checkpoint)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    per, details = {}, {}
    for c, images in streams.items():
        model.load_state_dict(initial)
        res, _ = run_tta(model, images, data.preprocess, tta)
        per[c] = data.score(res.logits, images.labels)
        details[c] = {"resets": res.resets, "filtered_out": res.filtered_out, "final_ema": res.final_ema,
                      "filtered_out_second": sum(r.passed_first - r.passed_second for r in res.records),
                      "updates": sum(not r.skipped for r in res.records), "batches": len(res.records)}
    return per, details


def sar_base(row: dict) -> str | None:
    """The row a SAR row adapted (``base``; results written before rows named it: the name before ``+sar``)."""
    if "base" in row:
        return row["base"]
    return row["name"][: -len("+sar")] if row["name"].endswith("+sar") else None


def sar_base_lr(row: dict, config: dict) -> float | None:
    """The base lr a SAR row ran at (None: SAR's reference); results written before rows recorded it ran at
    the config's lr for the row's suffix (``+sar``: ``sar_base_lr``)."""
    if "sar_base_lr" in row:
        return row["sar_base_lr"]
    suffix = row["name"][len(sar_base(row)):]
    return config.get(SAR_ROWS.get(suffix, ""))


def score_row(name: str, key: str, metrics: dict[str, dict[str, float]], corruptions: list[str]) -> dict:
    """One table row from :func:`evaluate_checkpoints` metrics: clean, disjoint (odd) and joint (even) means."""
    odd = {c: metrics[f"odd/{c}"][key] for c in corruptions}
    even = {c: metrics[f"even/{c}"][key] for c in corruptions if key in metrics.get(f"even/{c}", {})}
    return {"name": name, "clean": metrics["clean"][key] if "clean" in metrics else None, "disjoint": mean_or_nan(odd.values()),
            "joint": mean_or_nan(even.values()) if even else None, "per_corruption": odd, "per_corruption_joint": even}


def sanity_checks(rows: list[dict], chance: float | None, sar_tolerance: float = 1.0, chance_margin: float = 5.0) -> dict:
    """What the issue asks the numbers to show, computed rather than eyeballed.

    * ``deployed_near_chance``: corruptions on which the deployed model is within ``chance_margin`` points of
      chance (in %) — a sign the corruption parameters are wrong for the image size;
    * ``<soup>+sar_change``: per soup, the mean and worst per-corruption change SAR makes relative to the same
      soup without adaptation, and the corruptions where it loses more than ``sar_tolerance`` points.
    """
    by_name = {r["name"]: r for r in rows}
    out: dict = {}
    if chance is not None and "deployed" in by_name:
        out["chance"], out["chance_margin"] = chance, chance_margin
        out["deployed_near_chance"] = [c for c, v in by_name["deployed"]["per_corruption"].items() if v < chance + chance_margin]
    for name, r in by_name.items():
        base_name = sar_base(r)
        if base_name in by_name:
            base = by_name[base_name]["per_corruption"]
            delta = {c: r["per_corruption"][c] - base[c] for c in r["per_corruption"]}
            out[f"{name}_change"] = {"mean": mean_or_nan(delta.values()), "worst": min(delta.values()),
                                     "worst_corruption": min(delta, key=delta.get),
                                     "below_tolerance": [c for c, d in delta.items() if d < -sar_tolerance],
                                     "tolerance": sar_tolerance}
    return out


def mean_or_nan(values) -> float:
    """The mean of the values that are not None (NaN when there are none)."""
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else float("nan")


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


def markdown_table(result: dict) -> str:
    def fmt(v):
        return "—" if v is None or (isinstance(v, float) and v != v) else f"{v:.2f}"

    lines = [
        f"# {TITLES.get(result['benchmark'], result['benchmark'])}, severity {result['severity']} ({result['mode']} mode)",
        "",
        *provenance_lines(result),
        "",
        *([f"Protocol **{result['protocol']}**"
           + (f" (every ingredient, supervised ones too, LP-FT from the pre-trained stock `{Path(result['pretrained']).name}`)"
              if result.get("pretrained") else " (ingredients made from the deployed model)")
           + (f"; split **{result['split']['used']}**: {result['split']['corrupted']}; {result['split']['clean']}."
              if result.get("split", {}).get("used", "all") != "all" else "."), ""] if "protocol" in result else []),
        "| row | clean | disjoint (odd images, mean over corruptions) | joint (even images) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {fmt(r['clean'])} | {fmt(r['disjoint'])} | {fmt(r['joint'])} |")
    lines += ["", "Per corruption (disjoint, odd images):", "",
              "| row | " + " | ".join(result["rows"][0]["per_corruption"]) + " |",
              "|---|" + "---|" * len(result["rows"][0]["per_corruption"])]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(v) for v in r["per_corruption"].values()) + " |")
    by_name = {r["name"]: r for r in result["rows"]}
    sar_rows = [r for r in result["rows"] if sar_base(r) in by_name]
    if sar_rows:
        lines += ["", "Table 2 — test-time adaptation (SAR, online over each corruption's odd images, restarted from "
                      "the soup for every corruption):", "",
                  "| soup | SAR lr per 64 images | without SAR | with SAR | change | worst corruption change | corruptions below −1 point |",
                  "|---|---|---|---|---|---|---|"]
        for with_sar in sar_rows:
            n = sar_base(with_sar)
            r = by_name[n]
            change = result.get("checks", {}).get(f"{with_sar['name']}_change", {})
            worst = f"{change['worst']:+.2f} ({change['worst_corruption']})" if change else "—"
            below = (", ".join(change["below_tolerance"]) or "none") if change else "—"
            base_lr = sar_base_lr(with_sar, result["config"])
            lr = f"{base_lr:g}" if base_lr is not None else "reference"
            lines.append(f"| {n} | {lr} | {fmt(r['disjoint'])} | {fmt(with_sar['disjoint'])} | "
                         f"{with_sar['disjoint'] - r['disjoint']:+.2f} | {worst} | {below} |")
    if result.get("paired"):
        first = next(iter(next(iter(result["paired"].values())).values()))
        unit = (f"over the {first['clusters']:,} test images behind the {first['images']:,} evaluation images (each test image "
                "with all its corruptions)" if first.get("clusters", first["images"]) < first["images"] else "over evaluation images")
        lines += ["", f"Paired differences (row minus row, percentage points; 95% percentile bootstrap {unit}, "
                      f"{first['resamples']:,} resamples):", "",
                  "| comparison | disjoint (odd images, pooled) | 95% CI | clean | 95% CI |", "|---|---|---|---|---|"]
        for key, entry in result["paired"].items():
            cells = []
            for where in ("disjoint", "clean"):
                e = entry.get(where)
                cells += [f"{e['mean']:+.2f}", f"[{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]"] if e else ["—", "—"]
            lines.append(f"| {key.replace('-', ' − ', 1)} | " + " | ".join(cells) + " |")
    checks = result.get("checks", {})
    if "deployed_near_chance" in checks:
        near = checks["deployed_near_chance"]
        lines += ["", f"Deployed model within {checks['chance_margin']:g} points of chance ({checks['chance']:g}%) on: "
                      f"{', '.join(near) if near else 'no corruption'}."]
    cost = result.get("self_season_cost")
    if cost:
        lines += ["", f"Self-Seasoning: {cost['ingredients']} ingredients stacked once ({cost['stacked_mb']} MB), "
                      f"{cost['epochs']} epochs over {cost['subset']} target images in {cost['wall_s']:.0f} s; "
                      f"process RSS peak {cost.get('rss_peak_mb')} MB (+{cost.get('rss_rise_mb')} MB during the stage)."]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()), ""]
    return "\n".join(lines)


def plot_results(result: dict, per_corruption_png: Path, soups_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    corruptions = list(rows[0]["per_corruption"])
    fig, ax = plt.subplots(figsize=(max(8, len(corruptions) * 0.9), 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(corruptions)) + i * width, [r["per_corruption"][c] for c in corruptions], width, label=r["name"])
    ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%) on odd images")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{TITLES.get(result['benchmark'], result['benchmark'])}, severity {result['severity']} ({result['mode']})")
    fig.tight_layout()
    with atomic_path(per_corruption_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ing = result["ingredients"]
    def x_of(v):  # without a clean set, soups and ingredients are drawn in one column
        return 0.0 if v is None else v

    ax.scatter([x_of(v["clean"]) for v in ing.values()], [v["disjoint"] for v in ing.values()], label="self-soup ingredients", color="gray")
    for r in rows:
        if not r["name"].endswith("best_ingredient") and "sar" not in r:  # SAR rows have no clean accuracy
            ax.scatter([x_of(r["clean"])], [r["disjoint"]], label=r["name"], marker="*", s=120)
    ax.set_xlabel("clean top-1 (%)" if result["stock"]["clean_acc"] is not None else "(no clean set)")
    ax.set_ylabel("shifted top-1 (%), disjoint (odd) images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(soups_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


C10CConfig = BenchConfig  # the CIFAR-10-C name of the same settings


def run_imagenet_c(cfg: BenchConfig, root: str, source: str, **kwargs) -> dict:
    """ImageNet-C or LAION-C with the protocol, split and rows of CIFAR-10-C: :func:`adaptsoup_bench.imagenet_c.run_imagenet_c`."""
    from adaptsoup_bench.imagenet_c import run_imagenet_c as run

    return run(cfg, root, source, **kwargs)
