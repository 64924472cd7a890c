"""A seeded, paired percentile bootstrap over target images of a candidate's estimated gain over the
deployed model.

Each resample draws N target images with replacement; the SAME draw goes to every model (and, for ALine,
to every pair of models), so what two models share cancels out of their difference.  A draw is held as
weights (how often each image was drawn, over N), so a resampled estimate is a weighted mean of the
per-image scores and every resample of every model costs one matrix product.  The statistic is the mean
over the voting estimators of (candidate estimate - deployed estimate), in points.

The validation side (temperatures, thresholds, label marginal, ID accuracies) is fitted once and held
fixed: the interval is over which target images were met, not over the validation set.  COT's per-image
costs come from its assignment on all target images, not re-solved per resample (see
:mod:`adaptsoup.estimate.cot`).  ALine is refitted on every resample's target agreements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate.aline import fit_line
from adaptsoup.estimate.prepare import Prepared, aline_values

CHUNK = 100  # resamples drawn at once: a [CHUNK, N] weight matrix


@dataclass(frozen=True)
class Interval:
    """The statistic on all images and its percentile bootstrap interval."""

    point: float
    low: float
    high: float
    level: float
    resamples: int


def resample_weights(n: int, resamples: int, seed: int) -> Iterator[torch.Tensor]:
    """Seeded bootstrap draws of ``n`` images, ``CHUNK`` at a time: rows of weights (draw counts / n) summing to 1."""
    if n < 1 or resamples < 1:
        raise AdaptsoupError(f"a bootstrap needs images and resamples, got {n} images and {resamples} resamples")
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, resamples, CHUNK):
        rows = min(CHUNK, resamples - start)
        drawn = torch.randint(n, (rows, n), generator=generator)
        yield torch.zeros(rows, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(rows, n, dtype=torch.float64)) / n


def percentile_interval(values: torch.Tensor, point: float, level: float) -> Interval:
    """The (1 - level)/2 and (1 + level)/2 quantiles of the resampled ``values`` (NaNs left out)."""
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        return Interval(point, math.nan, math.nan, level, values.numel())
    tail = (1.0 - level) / 2
    low, high = torch.quantile(kept, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(point, low, high, level, values.numel())


def resampled_estimates(prepared: Prepared) -> dict[str, dict[str, torch.Tensor | None]]:
    """``{model: {estimator: [R] accuracy %}}`` over the configured bootstrap resamples (None where ALine
    abstains on all images; NaN in the resamples that leave ALine no line to fit)."""
    config = prepared.config
    out: dict[str, dict[str, list]] = {name: {e: [] for e in scores} for name, scores in prepared.image_scores.items()}
    use_aline = prepared.agreement is not None and any(v is not None for v in aline_values(prepared.aline).values())
    aline_rows: list[list[float]] = []  # per resample: ALine-S then ALine-D of every model
    for weights in resample_weights(prepared.target_images, config.bootstrap_resamples, config.seed):
        for name, scores in prepared.image_scores.items():
            for e, per_image in scores.items():
                out[name][e].append(weights @ per_image)
        if use_aline:
            data = prepared.agreement
            for agreement_ood in weights @ data.target_agree.T:
                fit = fit_line(data.accuracy_id, data.agreement_id, agreement_ood, data.pairs, config.aline)
                missing = [math.nan] * len(prepared.names)
                aline_rows.append((fit.aline_s or missing) + (fit.aline_d or missing))
    result: dict[str, dict[str, torch.Tensor | None]] = {name: {e: torch.cat(v) for e, v in per.items()} for name, per in out.items()}
    table = torch.tensor(aline_rows, dtype=torch.float64) if aline_rows else None
    for offset, (key, values) in enumerate(aline_values(prepared.aline).items()):
        if key in config.estimators:
            for index, name in enumerate(prepared.names):
                usable = values is not None and table is not None
                result[name][key] = table[:, offset * len(prepared.names) + index] if usable else None
    return result


def bootstrap_gain(prepared: Prepared, resampled: dict[str, dict[str, torch.Tensor | None]], candidate: str, deployed: str,
                   voters: list[str], point: float) -> Interval:
    """The paired interval of ``candidate``'s mean gain over ``deployed`` across ``voters`` (points), from
    :func:`resampled_estimates`; ``point`` is that mean gain on all target images."""
    gains = [resampled[candidate][e] - resampled[deployed][e] for e in voters]
    if not gains:
        raise AdaptsoupError(f"no estimator votes on {candidate} against {deployed}: nothing to bootstrap")
    return percentile_interval(torch.stack(gains).mean(dim=0), point, prepared.config.bootstrap_level)
