"""The two calls a pipeline makes: every estimate of every model as plain JSON-able data
(:func:`estimate_models`), and the same plus the deploy recommendation (:func:`estimate_and_recommend`)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate.bootstrap import bootstrap_gain, resampled_estimates
from adaptsoup.estimate.config import DecisionConfig, EstimateConfig
from adaptsoup.estimate.decision import Recommendation, recommend, voters
from adaptsoup.estimate.prepare import Prepared, estimates_of, prepare


def plain(value):
    """``value`` as JSON would give it back: tuples become lists (dataclasses.asdict keeps them)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def summary(prepared: Prepared) -> dict:
    """The estimates as plain data (percent; None where an estimator abstains) for a manifest or a JSON file."""
    return {
        "models": list(prepared.names),
        "images": {"target": prepared.target_images, "validation": prepared.validation_images},
        "validation_accuracy": dict(prepared.validation_accuracy),
        "temperature": dict(prepared.temperatures),
        "estimates": estimates_of(prepared),
        "aline": None if prepared.aline is None else prepared.aline.to_dict(prepared.names),
        "config": plain(dataclasses.asdict(prepared.config)),
    }


def estimate_models(target_logits: Mapping[str, torch.Tensor], validation_logits: Mapping[str, torch.Tensor], validation_labels,
                    config: EstimateConfig = EstimateConfig()) -> dict:
    """Every configured estimator's target accuracy (percent) for every model, plus ALine's R^2 and abstention.

    ``target_logits[name]`` ``[N, C]`` on the unlabeled target images and ``validation_logits[name]``
    ``[M, C]`` on labeled in-distribution images the models were not trained on (``validation_labels``
    ``[M]``), the same images in the same order for every model.  Returns ``{"models", "images",
    "validation_accuracy", "temperature", "estimates": {model: {estimator: % or None}}, "aline": {"r2",
    "slope", "intercept", "abstain", "reason", "fit"}, "config"}``.  Bad input raises a one-line AdaptsoupError.
    """
    return summary(prepare(target_logits, validation_logits, validation_labels, config))


def recommend_prepared(prepared: Prepared, deployed: str, decision: DecisionConfig = DecisionConfig(),
                       candidates: list[str] | None = None, resampled: dict | None = None) -> Recommendation:
    """The deploy rule on prepared estimates: each candidate's bootstrap interval, then :func:`recommend`.

    ``candidates``: the models that may be deployed (default: every model but ``deployed``); the others only
    join agreement-on-the-line's pool.  ``resampled``: :func:`resampled_estimates` of ``prepared``, when the
    caller already has them (several rules scored on one target)."""
    if deployed not in prepared.names:
        raise AdaptsoupError(f"the deployed model {deployed!r} is not among the models ({', '.join(prepared.names)})")
    not_computed = [e for e in decision.estimators if e not in prepared.config.estimators]
    if not_computed:
        raise AdaptsoupError(f"the decision's estimator(s) {', '.join(not_computed)} are not among the computed ones ({', '.join(prepared.config.estimators)})")
    candidates = [name for name in prepared.names if name != deployed] if candidates is None else list(candidates)
    unknown = [name for name in candidates if name not in prepared.names or name == deployed]
    if unknown:
        raise AdaptsoupError(f"candidate(s) {', '.join(unknown)} are not among the estimated models other than the deployed one")
    estimates = estimates_of(prepared)
    votes = {name: voters(estimates, name, deployed, decision) for name in candidates}
    if resampled is None:
        resampled = resampled_estimates(prepared) if any(votes.values()) else {}
    intervals = {}
    for name, voting in votes.items():
        if voting:
            point = sum(estimates[name][e] - estimates[deployed][e] for e in voting) / len(voting)
            interval = bootstrap_gain(prepared, resampled, name, deployed, voting, point)
            intervals[name] = (interval.low, interval.high)
    return recommend({name: estimates[name] for name in [deployed, *candidates]}, deployed, intervals, decision)


def estimate_and_recommend(target_logits: Mapping[str, torch.Tensor], validation_logits: Mapping[str, torch.Tensor], validation_labels,
                           deployed: str, config: EstimateConfig = EstimateConfig(),
                           decision: DecisionConfig = DecisionConfig(), candidates: list[str] | None = None) -> dict:
    """:func:`estimate_models`'s dictionary plus ``"recommendation"``: which model to deploy (``deployed``, the
    name of the deployed model, or a candidate), its estimated gain with the bootstrap interval, and the rule."""
    prepared = prepare(target_logits, validation_logits, validation_labels, config)
    out = summary(prepared)
    out["recommendation"] = plain(recommend_prepared(prepared, deployed, decision, candidates).to_dict())
    out["decision_config"] = plain(dataclasses.asdict(decision))
    return out
