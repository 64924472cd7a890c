"""What a single-model accuracy estimator is, and the table of them by name.

An estimator is two pure functions on float64 softmax outputs (temperature-scaled by the caller):

- ``fit(validation_probs, validation_labels, config) -> state``: what it learns from the labeled
  in-distribution validation images (a threshold, a mean confidence, the label marginal);
- ``image_scores(target_probs, state, config) -> [N]``: one number per target image, in percent, whose mean
  is the estimated target accuracy.

Splitting an estimate into per-image scores is what lets :mod:`adaptsoup.estimate.bootstrap` resample
target images cheaply: the validation side is fitted once, the target side is a mean.  Each estimator
module registers itself with :func:`register`; this module imports none of them, so import
:mod:`adaptsoup.estimate` (which imports every one) before :func:`get` or :func:`names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from adaptsoup.errors import AdaptsoupError


@dataclass(frozen=True)
class Estimator:
    """A registered single-model estimator (see the module docstring for ``fit`` and ``image_scores``)."""

    name: str
    fit: Callable[[torch.Tensor, torch.Tensor, Any], Any]
    image_scores: Callable[[torch.Tensor, Any, Any], torch.Tensor]

    def estimate(self, target_probs: torch.Tensor, validation_probs: torch.Tensor, validation_labels: torch.Tensor, config: Any) -> float:
        """The estimated target accuracy in percent: the mean of the per-image scores."""
        state = self.fit(validation_probs, validation_labels, config)
        return float(self.image_scores(target_probs, state, config).mean())


_ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, fit: Callable, image_scores: Callable) -> Estimator:
    """Add an estimator to the table under ``name``; returns it."""
    if name in _ESTIMATORS:
        raise ValueError(f"estimator {name!r} registered twice")
    _ESTIMATORS[name] = Estimator(name, fit, image_scores)
    return _ESTIMATORS[name]


def get(name: str) -> Estimator:
    if name not in _ESTIMATORS:
        raise AdaptsoupError(f"unknown estimator {name!r}; choose one of: {', '.join(names())}")
    return _ESTIMATORS[name]


def names() -> list[str]:
    return sorted(_ESTIMATORS)
