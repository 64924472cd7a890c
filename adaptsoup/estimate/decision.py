"""The deploy decision: a pure, conservative rule on label-free accuracy estimates.

Switch away from the deployed model only when

1. every voting estimator (the configured set, less those that abstain: ALine off its line) estimates a
   gain of at least ``margin`` points for the candidate, AND
2. the bootstrap lower bound of the voters' mean estimated gain is above 0;

among the candidates that qualify, take the one with the largest smallest gain over the voters.
Otherwise keep the deployed model.  Published estimators miss by 3-5 points on CIFAR-10-C, more than the
gains at stake (issue #21), hence "every estimator agrees" rather than "their mean says so".  The margin and
the voters (:class:`~adaptsoup.estimate.config.DecisionConfig`) must be chosen on the tuning split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from adaptsoup.errors import AdaptsoupError
from adaptsoup.estimate.config import DecisionConfig

Estimates = Mapping[str, Mapping[str, float | None]]  # {model: {estimator: accuracy % or None (abstains)}}


@dataclass(frozen=True)
class CandidateGain:
    """One candidate against the deployed model: each voter's estimated gain (points) and the verdict."""

    name: str
    gains: dict[str, float]
    min_gain: float | None
    mean_gain: float | None
    ci95: tuple[float, float] | None  # bootstrap interval of the mean gain (named for the default 95% level)
    qualifies: bool
    why: str


@dataclass(frozen=True)
class Recommendation:
    """Which model to deploy, its estimated gain over the deployed model (0 when it is the deployed one),
    the bootstrap interval of that gain, and the rule that chose it, in words."""

    model: str
    deployed: str
    switch: bool
    gain: float
    ci95: tuple[float, float]
    rule: str
    reason: str
    margin: float
    estimators: list[str]
    candidates: list[CandidateGain]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rule_text(config: DecisionConfig) -> str:
    return (f"switch from the deployed model only when every non-abstaining estimator of {', '.join(config.estimators)} "
            f"estimates a gain of at least {config.margin:g} points and the bootstrap lower bound of their mean gain is above 0; "
            "among such candidates take the one with the largest smallest gain; otherwise keep the deployed model")


def voters(estimates: Estimates, candidate: str, deployed: str, config: DecisionConfig) -> list[str]:
    """The configured estimators with an estimate (no abstention) for both models."""
    missing = [e for e in config.estimators if e not in estimates[deployed]]
    if missing:
        raise AdaptsoupError(f"the decision's estimator(s) {', '.join(missing)} were not computed; compute them or leave them out of the decision")
    return [e for e in config.estimators if estimates[candidate].get(e) is not None and estimates[deployed].get(e) is not None]


def judge(estimates: Estimates, candidate: str, deployed: str, interval: tuple[float, float] | None,
          config: DecisionConfig) -> CandidateGain:
    """``candidate`` against ``deployed`` under the rule (module docstring)."""
    voting = voters(estimates, candidate, deployed, config)
    gains = {e: float(estimates[candidate][e] - estimates[deployed][e]) for e in voting}
    if not gains:
        return CandidateGain(candidate, gains, None, None, interval, False, "no estimator votes (all abstain)")
    low_name = min(gains, key=gains.get)
    smallest, mean = gains[low_name], sum(gains.values()) / len(gains)
    if smallest < config.margin:
        why = f"{low_name} estimates {smallest:+.2f} points, under the {config.margin:g}-point margin"
    elif interval is None or not interval[0] > 0:  # a NaN bound does not qualify either
        why = "no bootstrap interval" if interval is None else f"bootstrap lower bound {interval[0]:+.2f} is not above 0"
    else:
        why = f"every voting estimator ({', '.join(gains)}) gains at least {config.margin:g} points; bootstrap lower bound {interval[0]:+.2f}"
        return CandidateGain(candidate, gains, smallest, mean, interval, True, why)
    return CandidateGain(candidate, gains, smallest, mean, interval, False, why)


def recommend(estimates: Estimates, deployed: str, intervals: Mapping[str, tuple[float, float] | None],
              config: DecisionConfig = DecisionConfig()) -> Recommendation:
    """The rule on numbers: ``estimates`` of every model (the deployed one included), ``intervals`` of each
    candidate's mean estimated gain (from :func:`adaptsoup.estimate.bootstrap.bootstrap_gain`)."""
    if deployed not in estimates:
        raise AdaptsoupError(f"the deployed model {deployed!r} is not among the estimated models ({', '.join(estimates)})")
    if not config.estimators:
        raise AdaptsoupError("the decision needs at least one estimator")
    judged = [judge(estimates, name, deployed, intervals.get(name), config) for name in estimates if name != deployed]
    qualified = [c for c in judged if c.qualifies]
    common = dict(deployed=deployed, rule=rule_text(config), margin=config.margin, estimators=list(config.estimators), candidates=judged)
    if not qualified:
        reason = "no candidate to compare" if not judged else "no candidate qualifies: " + "; ".join(f"{c.name}: {c.why}" for c in judged)
        return Recommendation(model=deployed, switch=False, gain=0.0, ci95=(0.0, 0.0), reason=reason, **common)
    best = max(qualified, key=lambda c: (c.min_gain, -judged.index(c)))  # ties: the first given
    reason = f"{best.name}: {best.why}"
    return Recommendation(model=best.name, switch=True, gain=best.mean_gain, ci95=best.ci95, reason=reason, **common)
