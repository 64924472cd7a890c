"""Evaluation in the shift benchmarks: every row's and ingredient's accuracy on the clean, disjoint (odd) and
joint (even) images, the per-image correctness the paired bootstrap resamples, and the sanity checks the
results carry."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from adaptsoup.core.data import ImageSet
from adaptsoup.core.evaluation import evaluate_checkpoints
from adaptsoup.core.io import write_atomic
from adaptsoup_bench.shift_config import BenchConfig, sar_base
from adaptsoup_bench.shift_data import ShiftData
from adaptsoup_bench.shift_stats import mean_or_nan


def evaluate_rows(data: ShiftData, cfg: BenchConfig, soups: dict[str, Path], ingredients: dict[str, Path],
                  evals: dict[str, ImageSet], progress=None, logits: dict | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]], str]:
    """The accuracy of every checkpoint: the rows (``soups``) on every set of ``evals``, the self ingredients on
    clean and disjoint only (their joint accuracy is in no table), then the best of them on every set too.

    Returns the metrics (:func:`evaluate_checkpoints`'s, keyed ``ingredient:<name>`` for ingredients), the
    predictions per set and checkpoint, and the best ingredient: the one with the highest mean accuracy on
    the odd images (an oracle upper bound for picking one ingredient, not a method)."""
    candidates = {**soups, **{f"ingredient:{k}": v for k, v in ingredients.items()}}
    predictions: dict[str, dict[str, torch.Tensor]] = {}
    evaluate = functools.partial(evaluate_checkpoints, pre=data.preprocess, device=cfg.device, bf16=False, progress=progress, score=data.score,
                                 predictions=predictions)
    metrics = evaluate(soups, evals, logits=logits)  # the rows' logits, when asked for, serve the label-free estimates
    metrics = evaluate(candidates, {k: v for k, v in evals.items() if not k.startswith("even/")}, known=metrics)
    best = max(ingredients, key=lambda k: mean_or_nan(metrics[f"odd/{c}"][f"ingredient:{k}"] for c in data.corruptions))
    metrics = evaluate({f"ingredient:{best}": ingredients[best]}, evals, known=metrics)
    return metrics, predictions, best


def ingredient_scores(metrics: dict[str, dict[str, float]], ingredients, corruptions: list[str]) -> dict[str, dict]:
    """Each self ingredient's clean accuracy (None without a clean set) and mean disjoint accuracy."""
    return {k: {"clean": metrics["clean"][f"ingredient:{k}"] if "clean" in metrics else None,
                "disjoint": mean_or_nan(metrics[f"odd/{c}"][f"ingredient:{k}"] for c in corruptions)} for k in ingredients}


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
