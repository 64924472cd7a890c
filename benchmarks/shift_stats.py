"""The statistics of the shift benchmarks: paired comparisons of two rows on the same images, with a 95%
percentile bootstrap over test images (:func:`paired_bootstrap`), and the means the tables report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptsoup.core.data import ImageSet
from adaptsoup.errors import AdaptsoupError
from adaptsoup_bench.shift_config import PAIRS


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


def mean_or_nan(values) -> float:
    """The mean of the values that are not None (NaN when there are none)."""
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else float("nan")
