"""Agreement-on-the-line (Baek, Jiang, Raghunathan & Kolter, "Agreement-on-the-Line: Predicting the
Performance of Neural Networks under Distribution Shift", NeurIPS 2022): ALine-S and ALine-D.

Across a family of models, in-distribution (ID) and out-of-distribution (OOD) accuracy often lie on a line
after a probit transform Phi^-1; when they do, the agreement between pairs of models lies on the same line:

    Phi^-1(acc_OOD(i))    = a * Phi^-1(acc_ID(i))    + b        (accuracy line, needs OOD labels)
    Phi^-1(agr_OOD(i, j)) = a * Phi^-1(agr_ID(i, j)) + b        (agreement line, needs none)

where agr(i, j) is the fraction of images on which models i and j predict the same class.  ALine fits
(a, b) by least squares on the agreement of every pair of models (ID: the labeled validation images;
OOD: the unlabeled target images) and reports its R^2.  Then:

- ALine-S applies the line to each model's ID accuracy: acc_OOD(i) = Phi(a * Phi^-1(acc_ID(i)) + b).
- ALine-D solves, by least squares over all pairs (i, j), for the unknowns x_i = Phi^-1(acc_OOD(i)):

      (x_i + x_j) / 2 = Phi^-1(agr_OOD(i, j)) + a * [ (Phi^-1(acc_ID(i)) + Phi^-1(acc_ID(j))) / 2 - Phi^-1(agr_ID(i, j)) ]

  (the accuracy line minus the agreement line: b cancels), then acc_OOD(i) = Phi(x_i).

The estimates are only as good as the line: ALine ABSTAINS (``abstain`` and a ``reason``) when R^2 is below
``ALineConfig.min_r2`` (0.9) or there are fewer than ``min_models`` (3) models; its numbers are still
reported when a line could be fitted, but the deploy decision does not use them.  Values are clipped to
[clip, 1 - clip] before Phi^-1, so a pair that always agrees does not become infinite.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate.checks import check_models
from adaptsoup.estimate.config import ALineConfig

FLAT = 1e-12  # a sum of squares below this is zero: no variation to fit a line through


@dataclass(frozen=True)
class AgreementData:
    """ALine's input from M models' predictions: ID accuracies, ID agreements, and per-image target agreement."""

    accuracy_id: torch.Tensor  # [M] fractions
    agreement_id: torch.Tensor  # [P] fractions, one per pair
    target_agree: torch.Tensor  # [P, N] 1.0 where the pair predicts the same class on target image n
    pairs: list[tuple[int, int]]


@dataclass(frozen=True)
class ALineResult:
    """ALine's fit and estimates (percent, one per model; None where no line could be fitted)."""

    aline_s: list[float] | None
    aline_d: list[float] | None
    r2: float | None
    slope: float | None
    intercept: float | None
    abstain: bool
    reason: str | None  # why it abstains (None when it does not)

    def to_dict(self, names: list[str]) -> dict:
        per_model = {key: None if values is None else dict(zip(names, values))
                     for key, values in (("aline-s", self.aline_s), ("aline-d", self.aline_d))}
        return {"r2": self.r2, "slope": self.slope, "intercept": self.intercept, "abstain": self.abstain,
                "reason": self.reason, "fit": per_model}


def abstained(reason: str) -> ALineResult:
    return ALineResult(None, None, None, None, None, True, reason)


def probit(values: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.special.ndtri(values.to(torch.float64).clamp(clip, 1.0 - clip))


def agreement_data(target_predictions: list[torch.Tensor], validation_predictions: list[torch.Tensor],
                   validation_labels: torch.Tensor) -> AgreementData:
    """ID accuracy of each model, and ID / per-image target agreement of each pair, from predicted classes."""
    pairs = list(itertools.combinations(range(len(target_predictions)), 2))
    accuracy = torch.stack([(p == validation_labels).to(torch.float64).mean() for p in validation_predictions])
    agreement = torch.stack([(validation_predictions[i] == validation_predictions[j]).to(torch.float64).mean() for i, j in pairs]
                            ) if pairs else torch.zeros(0, dtype=torch.float64)
    target_agree = torch.stack([(target_predictions[i] == target_predictions[j]).to(torch.float64) for i, j in pairs]
                               ) if pairs else torch.zeros(0, len(target_predictions[0]), dtype=torch.float64)
    return AgreementData(accuracy, agreement, target_agree, pairs)


def fit_line(accuracy_id: torch.Tensor, agreement_id: torch.Tensor, agreement_ood: torch.Tensor,
             pairs: list[tuple[int, int]], config: ALineConfig = ALineConfig()) -> ALineResult:
    """ALine from the numbers (fractions): fit the agreement line, then ALine-S and ALine-D (module docstring)."""
    models = len(accuracy_id)
    if models < config.min_models:
        return abstained(f"agreement-on-the-line needs at least {config.min_models} models, got {models}")
    x, y = probit(agreement_id, config.clip), probit(agreement_ood, config.clip)
    ss_x = float(((x - x.mean()) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_x < FLAT:
        return abstained("every pair of models agrees equally often on the validation images: no line to fit")
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ss_x)
    intercept = float(y.mean() - slope * x.mean())
    if ss_tot < FLAT:
        return abstained("every pair of models agrees equally often on the target images: R^2 is undefined")
    r2 = 1.0 - float(((y - (slope * x + intercept)) ** 2).sum()) / ss_tot
    u = probit(accuracy_id, config.clip)
    aline_s = torch.special.ndtr(slope * u + intercept)
    design = torch.zeros(len(pairs), models, dtype=torch.float64)
    for row, (i, j) in enumerate(pairs):
        design[row, i] = design[row, j] = 0.5
    first, second = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    rhs = y + slope * ((u[first] + u[second]) / 2 - x)
    aline_d = torch.special.ndtr(torch.linalg.lstsq(design, rhs[:, None]).solution[:, 0])
    abstain = r2 < config.min_r2
    reason = f"R^2 {r2:.3f} < {config.min_r2}: the models' agreements are not on a line" if abstain else None
    return ALineResult((aline_s * 100).tolist(), (aline_d * 100).tolist(), r2, slope, intercept, abstain, reason)


def aline_from_data(data: AgreementData, config: ALineConfig = ALineConfig()) -> ALineResult:
    """ALine on :func:`agreement_data`: the target agreement of each pair is its mean over the target images."""
    return fit_line(data.accuracy_id, data.agreement_id, data.target_agree.mean(dim=1), data.pairs, config)


def aline(target_logits: list[torch.Tensor], validation_logits: list[torch.Tensor], validation_labels,
          config: ALineConfig = ALineConfig()) -> ALineResult:
    """ALine-S and ALine-D for each model from their logits (lists in the same model order)."""
    if len(target_logits) != len(validation_logits):
        raise AdaptsoupError(f"ALine: {len(target_logits)} target logits but {len(validation_logits)} validation logits")
    if len(target_logits) < 2:
        raise AdaptsoupError(f"ALine compares pairs of models: give at least 2 models' logits (3 for a line), got {len(target_logits)}")
    names = [str(i) for i in range(len(target_logits))]
    target, validation, labels = check_models(dict(zip(names, target_logits)), dict(zip(names, validation_logits)), validation_labels)
    data = agreement_data([target[n].argmax(dim=1) for n in names], [validation[n].argmax(dim=1) for n in names], labels)
    return aline_from_data(data, config)
