"""ATC, Average Thresholded Confidence (Garg, Balakrishnan, Lipton, Neyshabur & Sedghi, "Leveraging Unlabeled
Data to Predict Out-of-Distribution Performance", ICLR 2022).

After temperature scaling, each image gets a confidence score s(x): the negative entropy
``sum_k p_k log p_k`` (ATC-NE, the paper's better variant) or the maximum softmax probability (ATC-MC).
On the labeled validation images, the threshold t is chosen so that the fraction of scores below it
equals the validation error:

    mean_val[ s(x) < t ] = mean_val[ argmax p(x) != y ]   ->   t = s_(e), the (e+1)-th smallest score,

where e is the number of misclassified validation images (t = +inf when all are wrong).  The estimated
target accuracy is the fraction of target images whose score reaches the threshold:

    ATC = 100 * mean_target[ s(x) >= t ].

So on the validation images themselves ATC returns the validation accuracy exactly (barring ties at t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from adaptsoup.estimate.checks import check_single, probabilities
from adaptsoup.estimate.registry import register
from adaptsoup.estimate.temperature import fit_temperature


def negative_entropy(probs: torch.Tensor) -> torch.Tensor:
    """sum_k p_k log p_k per row (0 log 0 = 0): 0 for a one-hot output, -log C for a uniform one."""
    return torch.xlogy(probs, probs).sum(dim=1)


def max_confidence(probs: torch.Tensor) -> torch.Tensor:
    return probs.max(dim=1).values


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ne": negative_entropy, "mc": max_confidence}


def atc_threshold(validation_scores: torch.Tensor, errors: int) -> float:
    """t such that exactly ``errors`` validation scores lie below it (barring ties): the (errors+1)-th smallest."""
    if errors >= validation_scores.numel():
        return math.inf
    return float(torch.sort(validation_scores).values[errors])


@dataclass(frozen=True)
class ATCState:
    threshold: float


def _fitter(score: str):
    def fit(validation_probs: torch.Tensor, validation_labels: torch.Tensor, config=None) -> ATCState:
        errors = int((validation_probs.argmax(dim=1) != validation_labels).sum())
        return ATCState(atc_threshold(SCORES[score](validation_probs), errors))

    return fit


def _image_scorer(score: str):
    def image_scores(target_probs: torch.Tensor, state: ATCState, config=None) -> torch.Tensor:
        return (SCORES[score](target_probs) >= state.threshold).to(torch.float64) * 100.0

    return image_scores


ESTIMATORS = {score: register(f"atc-{score}", _fitter(score), _image_scorer(score)) for score in SCORES}


def atc(target_logits: torch.Tensor, validation_logits: torch.Tensor, validation_labels, *, score: str = "ne",
        temperature: float | None = None) -> float:
    """ATC's estimated target accuracy in percent (``score``: ``ne`` or ``mc``; ``temperature``: fitted on the
    validation logits when None, 1.0 for none)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    target, validation, labels = check_single(target_logits, validation_logits, validation_labels)
    t = fit_temperature(validation, labels) if temperature is None else temperature
    return ESTIMATORS[score].estimate(probabilities(target, t), probabilities(validation, t), labels, None)
