"""The scoring of label-free estimates and of the deploy rule on shifts with known labels: each shift's
estimates against true accuracy, each estimator's error, and what a rule deploys against always-deployed,
always-the-candidate and the oracle.  Shared by the decision benchmark (:mod:`adaptsoup_bench.decision`) and
the shift benchmarks' ``estimates`` (:mod:`adaptsoup_bench.shift_estimates`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from adaptsoup.estimate.bootstrap import resampled_estimates
from adaptsoup.estimate.config import ALL_ESTIMATORS, DecisionConfig, EstimateConfig
from adaptsoup.estimate.prepare import estimates_of, prepare
from adaptsoup.estimate.run import recommend_prepared

DEPLOYED = "deployed"


@dataclass
class Shift:
    """One target: each model's logits on its unlabeled images, and true accuracy there and on its evaluation images."""

    name: str
    target: dict[str, torch.Tensor]
    accuracy_target: dict[str, float]
    accuracy_eval: dict[str, float]


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean() * 100)


def shifts_from_logits(logits: dict[str, dict[str, torch.Tensor]], labels: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Shift]:
    """One :class:`Shift` per name of ``labels`` (``{shift: (target labels, evaluation labels)}``) from each model's
    logits on ``even/<shift>`` (target) and ``odd/<shift>`` (evaluation), and all of them pooled."""
    shifts = []
    for c, (even, odd) in labels.items():
        shifts.append(Shift(c, {m: v[f"even/{c}"] for m, v in logits.items()},
                            {m: top1(v[f"even/{c}"], even) for m, v in logits.items()},
                            {m: top1(v[f"odd/{c}"], odd) for m, v in logits.items()}))
    pooled_target = {m: torch.cat([v[f"even/{c}"] for c in labels]) for m, v in logits.items()}
    shifts.append(Shift("pooled", pooled_target, {m: float(np.mean([s.accuracy_target[m] for s in shifts])) for m in logits},
                        {m: float(np.mean([s.accuracy_eval[m] for s in shifts])) for m in logits}))
    return shifts


def estimate_shift(shift: Shift, validation: dict[str, torch.Tensor], labels: torch.Tensor, resamples: int) -> tuple:
    prepared = prepare(shift.target, validation, labels, EstimateConfig(bootstrap_resamples=resamples))
    return prepared, estimates_of(prepared), resampled_estimates(prepared)


def bootstrap_mean(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of ``values`` (cases resampled)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def estimator_errors(shifts: list[Shift], estimates: dict[str, dict], models: list[str]) -> dict:
    """Per estimator: mean absolute error of the accuracy estimate on each shift's target images (over shifts x
    models, interval over shifts), and of the estimated gain over the deployed model (candidates)."""
    out = {}
    per_shift = [s for s in shifts if s.name != "pooled"]
    for e in ALL_ESTIMATORS:
        rows, gains, abstained = [], [], 0
        for s in per_shift:
            est = estimates[s.name]
            errors = [abs(est[m][e] - s.accuracy_target[m]) for m in models if est[m].get(e) is not None]
            abstained += sum(est[m].get(e) is None for m in models)
            if errors:
                rows.append(np.mean(errors))
            if est[DEPLOYED].get(e) is not None:
                gains += [abs((est[m][e] - est[DEPLOYED][e]) - (s.accuracy_target[m] - s.accuracy_target[DEPLOYED]))
                          for m in models if m != DEPLOYED and est[m].get(e) is not None]
        if rows:
            values = np.asarray(rows)
            out[e] = {"mae": float(values.mean()), "ci95": bootstrap_mean(values), "gain_mae": float(np.mean(gains)) if gains else None,
                      "shifts": len(rows), "abstained": abstained}
        else:
            out[e] = {"mae": None, "ci95": None, "gain_mae": None, "shifts": 0, "abstained": abstained}
    return out


def decide(prepared, est, resampled, candidates: list[str], rule: DecisionConfig) -> str:
    """The model the rule deploys on one shift (the others in ``prepared`` only join ALine's pool)."""
    return recommend_prepared(prepared, DEPLOYED, rule, candidates, resampled).model


def score_rule(shifts: list[Shift], estimated: dict, candidates: list[str], rule: DecisionConfig, primary: str) -> dict:
    """What ``rule`` deploys on each shift, against always-deployed, always-``primary`` and the oracle (points
    on the evaluation images), and the same for one decision on the pooled target applied to every shift."""
    per_shift = [s for s in shifts if s.name != "pooled"]
    chosen = {s.name: decide(*estimated[s.name], candidates, rule) for s in per_shift}
    pool = [DEPLOYED, *candidates]

    def acc(s: Shift, m: str) -> float:
        return s.accuracy_eval[m]

    oracle = {s.name: max(pool, key=lambda m: acc(s, m)) for s in per_shift}
    chosen_acc = np.array([acc(s, chosen[s.name]) for s in per_shift])
    deployed_acc = np.array([acc(s, DEPLOYED) for s in per_shift])
    pooled_choice = decide(*estimated["pooled"], candidates, rule)
    return {
        "rule": asdict(rule) | {"estimators": list(rule.estimators)},
        "chosen": float(chosen_acc.mean()), "deployed": float(deployed_acc.mean()),
        "always_candidate": float(np.mean([acc(s, primary) for s in per_shift])),
        "oracle": float(np.mean([acc(s, oracle[s.name]) for s in per_shift])),
        "worst_regret_vs_deployed": float(max(0.0, (deployed_acc - chosen_acc).max())),
        "picked_right": float(np.mean([acc(s, chosen[s.name]) == acc(s, oracle[s.name]) for s in per_shift])),
        "switched": int(sum(chosen[s.name] != DEPLOYED for s in per_shift)),
        "per_shift": {s.name: {"chosen": chosen[s.name], "oracle": oracle[s.name]} for s in per_shift},
        "pooled": {"chosen": pooled_choice, "accuracy": float(np.mean([acc(s, pooled_choice) for s in per_shift]))},
    }
