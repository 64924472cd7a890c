"""DoC, Difference of Confidences (Guillory, Shankar, Ebrahimi, Darrell & Schmidt, "Predicting with
Confidence on Unseen Distributions", ICCV 2021).

The drop in accuracy from validation to target is estimated by the drop in mean confidence, the
confidence of an image being its maximum softmax probability after temperature scaling:

    DoC = acc_val - (mean_val conf(x) - mean_target conf(x))        (in percent).

On the validation images themselves DoC returns the validation accuracy; a target whose confidences all
fall by d points scores d points lower.  Per target image the score is
``100 * (conf(x) + acc_val - mean_val conf)``, whose mean is DoC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptsoup.estimate.atc import max_confidence
from adaptsoup.estimate.checks import check_single, probabilities
from adaptsoup.estimate.registry import register
from adaptsoup.estimate.temperature import fit_temperature


@dataclass(frozen=True)
class DoCState:
    accuracy: float  # validation accuracy, a fraction
    confidence: float  # mean validation confidence, a fraction


def fit(validation_probs: torch.Tensor, validation_labels: torch.Tensor, config=None) -> DoCState:
    accuracy = float((validation_probs.argmax(dim=1) == validation_labels).to(torch.float64).mean())
    return DoCState(accuracy, float(max_confidence(validation_probs).mean()))


def image_scores(target_probs: torch.Tensor, state: DoCState, config=None) -> torch.Tensor:
    return (max_confidence(target_probs) + (state.accuracy - state.confidence)) * 100.0


ESTIMATOR = register("doc", fit, image_scores)


def doc(target_logits: torch.Tensor, validation_logits: torch.Tensor, validation_labels, *,
        temperature: float | None = None) -> float:
    """DoC's estimated target accuracy in percent (``temperature``: fitted on validation when None, 1.0 for none)."""
    target, validation, labels = check_single(target_logits, validation_logits, validation_labels)
    t = fit_temperature(validation, labels) if temperature is None else temperature
    return ESTIMATOR.estimate(probabilities(target, t), probabilities(validation, t), labels, None)
