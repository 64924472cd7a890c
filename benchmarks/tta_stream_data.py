"""The streams of the fair-stream TTA benchmark (:mod:`adaptsoup_bench.tta_stream`): which test images, corrupted
how (cached as ``.npy`` per corruption), in which order each setting shows them, one online pass over a stream,
the soup without TTA on the same images, and the scores of a pass.

Images are held as one uint8 tensor ``[K, N, 3, H, W]``: corruption ``k`` (the configuration's order) of the
``n``-th drawn test image.  A stream is a list of *segments*, each an ``[L, 2]`` array of (corruption, image)
pairs in the order shown; the adapter starts each segment from the soup (a reset between segments), and
batches never cross a segment's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.io import atomic_path
from adaptsoup.errors import AdaptsoupError

SETTINGS = ("reset", "continual", "mixed")
BATCH = 64
QUICK_PER_CORRUPTION = 1000  # the documented quick stream: 1,000 of the split's 5,000 test images per corruption
FISHER_IMAGES = 2000  # EATA's in-distribution images: seeded CIFAR-10 training images


# -- stream order (pure) -------------------------------------------------------------------------------------------


def corruption_order(k: int, n_images: int, seed: int) -> np.ndarray:
    """The order of corruption ``k``'s images within its block (reset and continual share it), seeded by (seed, k)."""
    return np.random.default_rng([seed, k]).permutation(n_images)


def stream_segments(setting: str, n_corruptions: int, n_images: int, seed: int) -> list[np.ndarray]:
    """The stream of a setting as segments of (corruption, image) pairs.

    ``reset``: one segment per corruption (the adapter back to the soup before each), shuffled within it;
    ``continual``: one segment, the corruptions' blocks in the fixed order, each shuffled within itself;
    ``mixed``: one segment, every (corruption, image) pair in one seeded global shuffle."""
    blocks = [np.stack([np.full(n_images, k), corruption_order(k, n_images, seed)], axis=1) for k in range(n_corruptions)]
    if setting == "reset":
        return blocks
    if setting == "continual":
        return [np.concatenate(blocks)]
    if setting == "mixed":
        pairs = np.stack(np.divmod(np.arange(n_corruptions * n_images), n_images), axis=1)
        return [pairs[np.random.default_rng([seed, n_corruptions, n_images]).permutation(len(pairs))]]
    raise AdaptsoupError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")


# -- one online pass, and the soup without TTA -------------------------------------------------------------------------


@dataclass
class StreamRun:
    logits: torch.Tensor  # [K, N, C]: each image's logits, made before its batch's update
    wall_s: float = 0.0
    batches: int = 0
    method_resets: int = 0  # the method's own resets (SAR's model recovery)
    guard_resets: int = 0  # the drift guard's (cfg.guard)
    stream_resets: int = 0  # the benchmark's: before each corruption of the reset setting
    records: list = field(default_factory=list)


def run_stream(make_adapter: Callable[[], object], images: torch.Tensor, segments: list[np.ndarray], pre: Preprocess,
               num_classes: int, batch_size: int = BATCH, on_batch: Callable[[], None] | None = None) -> StreamRun:
    """One online pass: each batch predicted, then adapted; the adapter is reset to the soup before every segment
    but the first (a fresh adapter starts there)."""
    t0 = time.perf_counter()
    adapter = make_adapter()
    logits = torch.full((images.shape[0], images.shape[1], num_classes), float("nan"))
    run = StreamRun(logits)
    for s, segment in enumerate(segments):
        if s > 0:
            adapter.reset()
            run.stream_resets += 1
        for i in range(0, len(segment), batch_size):
            k, n = (torch.as_tensor(c) for c in segment[i : i + batch_size].T)
            logits[k, n] = adapter.predict_and_adapt(pre.normalize(images[k, n])).float()
            run.batches += 1
            if on_batch is not None:
                on_batch()
    if torch.isnan(logits).any():
        raise AdaptsoupError("the stream did not show every (corruption, image) pair")
    run.records = list(adapter.records)
    run.method_resets = sum(bool(r.reset) for r in run.records)
    run.guard_resets = sum(r.guard_reset for r in run.records)
    run.wall_s = time.perf_counter() - t0
    return run


def plain_logits(model: torch.nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 500) -> torch.Tensor:
    """The soup without TTA: one forward pass over every (corruption, image), ``[K, N, C]``."""
    from adaptsoup.core.evaluation import run_model

    flat = images.reshape(-1, *images.shape[2:])
    out = run_model(model, ImageSet(images=flat, paths=[""] * len(flat)), pre, batch_size=batch_size).logits.float()
    return out.reshape(images.shape[0], images.shape[1], -1)


# -- scores (pure) -----------------------------------------------------------------------------------------------------


def correct_of(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per (corruption, image) top-1 correctness, bool ``[K, N]``."""
    return (logits.argmax(-1) == labels.view(1, -1)).numpy()


def score(correct: np.ndarray, base: np.ndarray, ids: np.ndarray, corruptions: list[str], resamples: int, seed: int = 0) -> dict:
    """Online accuracy over the whole stream and per corruption, and the paired difference to the soup without TTA on
    the same images (clusters: test images, so one image under every corruption is one cluster)."""
    from adaptsoup_bench.shift_stats import paired_bootstrap

    if correct.shape != base.shape or correct.shape != (len(corruptions), len(ids)):
        raise AdaptsoupError(f"scores need [corruptions, images] arrays, got {correct.shape} and {base.shape}")
    gain = paired_bootstrap(correct.reshape(-1), base.reshape(-1), resamples, seed, clusters=np.tile(ids, len(corruptions)))
    return {"accuracy": float(correct.mean() * 100), "per_corruption": {c: float(correct[k].mean() * 100) for k, c in enumerate(corruptions)},
            "gain": gain}


# -- the images -------------------------------------------------------------------------------------------------------


def load_npy(path: Path) -> np.ndarray | None:
    try:
        return np.load(path) if path.is_file() else None
    except (OSError, ValueError):  # a torn or foreign file is made again
        return None


def save_npy(path: Path, array: np.ndarray) -> None:
    """Written to a temporary file beside ``path``, then renamed onto it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def stream_images(test: ImageSet, indices: np.ndarray, corruptions: list[str], severity: int, cache: Path,
                  log: Callable[[str], None] = print, progress=None) -> torch.Tensor:
    """The drawn test images under every corruption, uint8 ``[K, N, 3, H, W]``; each corruption's array is cached as
    ``cache/<corruption>.npy`` (NHWC, with the indices beside it: a cache of other images is made again)."""
    from adaptsoup_bench.corruptions import corrupt_batch

    if load_npy(cache / "indices.npy") is None or not np.array_equal(load_npy(cache / "indices.npy"), indices):
        for stale in cache.glob("*.npy"):
            stale.unlink()
        save_npy(cache / "indices.npy", np.asarray(indices))
    originals = test.images[torch.as_tensor(indices)].permute(0, 2, 3, 1).numpy()
    task = progress.add_task(f"corrupt (severity {severity})", total=len(corruptions)) if progress is not None else None
    out = []
    for name in corruptions:
        array = load_npy(cache / f"{name}.npy")
        if array is None or array.shape != originals.shape:
            t0 = time.perf_counter()
            array = corrupt_batch(originals, name, severity, indices=indices)
            save_npy(cache / f"{name}.npy", array)
            log(f"corrupted {len(indices)} images by {name} (severity {severity}) in {time.perf_counter() - t0:.0f}s")
        out.append(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2))
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return torch.stack(out)


def fisher_images(train_root: Path, pre: Preprocess, count: int = FISHER_IMAGES, seed: int = 0) -> ImageSet:
    """EATA's in-distribution images: ``count`` training images drawn by ``seed`` (decoded alone, not the whole set)."""
    from adaptsoup.core.data import decode_images, scan_labeled_folder

    paths, _, _, _ = scan_labeled_folder(train_root)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(paths))[:count])
    images, kept, _ = decode_images([paths[i] for i in chosen], pre)
    return ImageSet(images=images[: len(kept)], paths=[str(paths[chosen[i]]) for i in kept])


def fisher_batches(images: ImageSet | None, pre: Preprocess, batch_size: int = BATCH):
    """EATA's Fisher inputs, normalised, in batches of the stream's size (None: no Fisher term)."""
    if images is None:
        return None
    return [pre.normalize(images.images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
