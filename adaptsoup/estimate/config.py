"""The knobs of the label-free estimates and of the deploy decision, in one place, with their defaults.

The decision's defaults (margin, voting estimators) were chosen on the tuning split of CIFAR-10-C
(``benchmarks/results/decision_c10c_full_s5_task-vector-tuning.md``), never on the images a result is
reported on.
"""

from __future__ import annotations

from dataclasses import dataclass

SINGLE_MODEL_ESTIMATORS = ("atc-ne", "atc-mc", "doc", "cot")  # one model's logits each (registered by name)
MULTI_MODEL_ESTIMATORS = ("aline-s", "aline-d")  # agreement-on-the-line: all models together
ALL_ESTIMATORS = SINGLE_MODEL_ESTIMATORS + MULTI_MODEL_ESTIMATORS


@dataclass(frozen=True)
class ALineConfig:
    """Agreement-on-the-line: when its line is trusted."""

    min_r2: float = 0.9  # abstain when the probit agreement line fits worse than this
    min_models: int = 3  # abstain with fewer models (fewer than 3 pairs: no line worth the name)
    clip: float = 1e-4  # accuracies and agreements are clipped to [clip, 1 - clip] before the probit


@dataclass(frozen=True)
class EstimateConfig:
    """What :func:`adaptsoup.estimate.run.estimate_models` computes, and how."""

    estimators: tuple[str, ...] = ALL_ESTIMATORS
    temperature_scaling: bool = True  # fit a temperature per model on the validation logits (else T = 1)
    cot_exact_max: int = 2048  # COT: one exact assignment up to this many target images, seeded batches beyond
    aline: ALineConfig = ALineConfig()
    bootstrap_resamples: int = 1000
    bootstrap_level: float = 0.95
    seed: int = 0  # COT's batches and the bootstrap's resamples


@dataclass(frozen=True)
class DecisionConfig:
    """The conservative deploy rule of :func:`adaptsoup.estimate.decision.recommend`.

    The defaults are the rule chosen on the tuning split (benchmarks/results/decision_rule.json): of 40 rules
    (margins 0-3 points x 8 sets of voters) the one whose choices had the best mean accuracy there without
    ever losing more than 0.5 points to the deployed model on a shift.  COT alone votes: its error was the
    smallest (4.7 points mean absolute error, 2.3 on gains), ATC, DoC and ALine missed by 10-17 points.
    """

    margin: float = 0.5  # points of estimated accuracy every voter must agree on
    estimators: tuple[str, ...] = ("cot",)  # the voters; abstaining ones (ALine off its line) do not vote
