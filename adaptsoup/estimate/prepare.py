"""Everything the estimates and their bootstrap need, computed once from the logits: per model its
temperature and each single-model estimator's per-image scores, and for ALine the pairwise agreements.

An estimate over any weighting of the target images (all equal: :func:`estimates_of`; a bootstrap
resample: :mod:`adaptsoup.estimate.bootstrap`) is then a weighted mean of per-image scores, or one ALine fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate import registry
from adaptsoup.estimate.aline import AgreementData, ALineResult, abstained, agreement_data, aline_from_data
from adaptsoup.estimate.checks import check_models, probabilities
from adaptsoup.estimate.config import ALL_ESTIMATORS, MULTI_MODEL_ESTIMATORS, EstimateConfig
from adaptsoup.estimate.temperature import fit_temperature


@dataclass(frozen=True)
class Prepared:
    names: list[str]  # the models, in the caller's order
    temperatures: dict[str, float]
    validation_accuracy: dict[str, float]  # percent
    image_scores: dict[str, dict[str, torch.Tensor]]  # model -> single-model estimator -> [N] percent
    agreement: AgreementData | None  # None when no ALine estimator was asked for
    aline: ALineResult | None  # ALine on all target images (None when not asked for)
    config: EstimateConfig
    target_images: int
    validation_images: int


def check_estimators(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in ALL_ESTIMATORS]
    if unknown:
        raise AdaptsoupError(f"unknown estimator(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(ALL_ESTIMATORS)}")
    if not names:
        raise AdaptsoupError("no estimators chosen")


def prepare(target_logits: Mapping[str, torch.Tensor], validation_logits: Mapping[str, torch.Tensor], validation_labels,
            config: EstimateConfig = EstimateConfig()) -> Prepared:
    """Check the inputs (one-line errors), fit each model's temperature and estimators on validation, score the target."""
    check_estimators(config.estimators)
    target, validation, labels = check_models(target_logits, validation_logits, validation_labels)
    names = list(target)
    temperatures, accuracy, scores = {}, {}, {}
    single = [e for e in config.estimators if e not in MULTI_MODEL_ESTIMATORS]
    for name in names:
        t = fit_temperature(validation[name], labels) if config.temperature_scaling else 1.0
        val_probs, target_probs = probabilities(validation[name], t), probabilities(target[name], t)
        temperatures[name] = t
        accuracy[name] = float((val_probs.argmax(dim=1) == labels).to(torch.float64).mean() * 100.0)
        scores[name] = {}
        for estimator_name in single:
            estimator = registry.get(estimator_name)
            scores[name][estimator_name] = estimator.image_scores(target_probs, estimator.fit(val_probs, labels, config), config)
    agreement, aline = None, None
    if any(e in MULTI_MODEL_ESTIMATORS for e in config.estimators):
        if len(names) < 2:
            aline = abstained(f"agreement-on-the-line needs at least {config.aline.min_models} models, got {len(names)}")
        else:
            agreement = agreement_data([target[n].argmax(dim=1) for n in names], [validation[n].argmax(dim=1) for n in names], labels)
            aline = aline_from_data(agreement, config.aline)
    return Prepared(names, temperatures, accuracy, scores, agreement, aline, config,
                    target_images=target[names[0]].shape[0], validation_images=labels.shape[0])


def estimates_of(prepared: Prepared) -> dict[str, dict[str, float | None]]:
    """``{model: {estimator: accuracy %}}`` over all target images; None where ALine abstains."""
    out: dict[str, dict[str, float | None]] = {}
    for index, name in enumerate(prepared.names):
        out[name] = {e: float(scores.mean()) for e, scores in prepared.image_scores[name].items()}
        for key, values in aline_values(prepared.aline).items():
            if key in prepared.config.estimators:
                out[name][key] = None if values is None else float(values[index])
    return out


def aline_values(result: ALineResult | None) -> dict[str, list[float] | None]:
    """ALine's estimates per model as the decision may use them: None when it abstains."""
    if result is None:
        return {}
    usable = not result.abstain
    return {"aline-s": result.aline_s if usable else None, "aline-d": result.aline_d if usable else None}
