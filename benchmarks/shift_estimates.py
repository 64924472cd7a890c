"""The label-free estimates and the deploy decision inside a shift benchmark's results (``bench c10c``,
``bench imagenet-c``): the ``estimates`` entry of the results JSON.

What ``adapt`` does for a user (stage 7, :mod:`adaptsoup.pipeline.recommend`), here scored against the
labels: per corruption, every row's accuracy on the unlabeled target images is estimated from its logits
there and on labeled in-distribution validation images, the package's default deploy rule
(:class:`adaptsoup.estimate.config.DecisionConfig`, chosen on the tuning split) picks the deployed model or
one of the deployable soups, and the pick is scored on the corruption's evaluation images.

* **Validation images**: the benchmark's clean images whose file name is none of the corrupted images'
  (``bench c10c`` names every image by its test index; ``bench imagenet-c`` needs ``--clean``, and ImageNet-C
  names its files after the validation images). Without them there are no estimates, and the entry says so.
* **Label space**: LAION-C is scored over 16 superclasses; its logits are turned into superclass scores
  (the log of each superclass's mean member probability) before estimating, so the estimates are of the
  accuracy the benchmark reports.
* **Candidates**: the soups a user would deploy (:data:`DEPLOYABLE`); every other row joins
  agreement-on-the-line's pool only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from adaptsoup.core.data import ImageSet
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import load_model
from adaptsoup.estimate.config import DecisionConfig
from adaptsoup_bench.decision_scoring import DEPLOYED, estimate_shift, estimator_errors, score_rule, shifts_from_logits

# the soups a user may deploy, in order of preference as the primary candidate of the gate
DEPLOYABLE = ("self_task_vector_soup", "self_soup_target", "self_soup_target_self_seasoned", "supervised_soup")
MIN_VALIDATION = 100  # fewer labeled validation images than this fit no threshold worth reporting


def validation_indices(evals: dict[str, ImageSet], minimum: int = MIN_VALIDATION) -> list[int] | None:
    """The positions in ``evals["clean"]`` of the clean images whose file stem is none of the corrupted (target or
    evaluation) images' stems; None when the benchmark has no clean images or fewer than ``minimum`` are left."""
    clean = evals.get("clean")
    if clean is None:
        return None
    corrupted = {Path(p).stem for key, images in evals.items() if key != "clean" for p in images.paths}
    keep = [i for i, p in enumerate(clean.paths) if Path(p).stem not in corrupted]
    return keep if len(keep) >= minimum else None


def validation_set(evals: dict[str, ImageSet], minimum: int = MIN_VALIDATION) -> ImageSet | None:
    """The images of :func:`validation_indices`, or None."""
    keep = validation_indices(evals, minimum)
    return None if keep is None else evals["clean"].subset(keep)


def logits_by_set(models: dict[str, Path], sets: dict[str, ImageSet], pre, to_labels: Callable | None, device: str = "cpu",
                  known: dict | None = None, subsets: dict[str, tuple[str, list[int]]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {set: logits in the benchmark's label space}}``, one model in memory at a time.  What ``known``
    (``{set: {model: logits}}``, e.g. the benchmark's evaluation) holds is taken from there, as is a set of
    ``subsets`` (``{set: (known set, positions)}``) whose known set holds the model; only the rest is run."""
    known, subsets = known or {}, subsets or {}
    out = {}
    for name, path in models.items():
        raw, model = {}, None
        for key, images in sets.items():
            parent, positions = subsets.get(key, (None, None))
            if name in known.get(key, {}):
                raw[key] = known[key][name]
            elif parent is not None and name in known.get(parent, {}):
                raw[key] = known[parent][name][torch.as_tensor(positions)]
            else:
                model = model or load_model(None, path)
                raw[key] = run_model(model, images, pre, device=device).logits.float()
        out[name] = {key: to_labels(v) if to_labels is not None else v for key, v in raw.items()}
        del model
    return out


def shift_estimates(soups: dict[str, Path], evals: dict[str, ImageSet], corruptions: list[str], pre, *,
                    to_labels: Callable | None = None, decision: DecisionConfig = DecisionConfig(), resamples: int = 200,
                    min_validation: int = MIN_VALIDATION, device: str = "cpu", known: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """The ``estimates`` entry: per corruption each row's estimates against its true target accuracy, each
    estimator's error, and the rule's decision per corruption scored on the evaluation images (its ``gate``,
    as the decision benchmark writes it).  ``known``: logits the caller already has, ``{set: {model: logits}}``."""
    keep = validation_indices(evals, min_validation)
    if keep is None:
        return {"skipped": f"fewer than {min_validation} labeled validation images (clean images none of the corrupted ones come "
                           "from; bench imagenet-c: give --clean) to fit the estimators on"}
    candidates = [name for name in DEPLOYABLE if name in soups]
    if DEPLOYED not in soups or not candidates:
        return {"skipped": "no deployed model or no deployable soup among the rows"}
    validation = evals["clean"].subset(keep)
    t0 = time.perf_counter()
    sets = {"validation": validation, **{f"{side}/{c}": evals[f"{side}/{c}"] for c in corruptions for side in ("even", "odd")}}
    logits = logits_by_set(soups, sets, pre, to_labels, device, known=known, subsets={"validation": ("clean", keep)})
    logits_s = time.perf_counter() - t0
    labels = {c: (evals[f"even/{c}"].labels, evals[f"odd/{c}"].labels) for c in corruptions}
    shifts = shifts_from_logits(logits, labels)
    val = {m: v["validation"] for m, v in logits.items()}
    estimated = {s.name: estimate_shift(s, val, validation.labels, resamples) for s in shifts}
    primary = candidates[0]
    gate = score_rule(shifts, estimated, candidates, decision, primary)
    log(f"estimates: the rule (margin {decision.margin}, {'+'.join(decision.estimators)}) deploys {gate['chosen']:.2f}% "
        f"against {gate['deployed']:.2f}% for the deployed model (worst regret {gate['worst_regret_vs_deployed']:.2f})")
    return {
        "validation_images": len(validation), "candidates": candidates, "primary": primary,
        "rule": {"margin": decision.margin, "estimators": list(decision.estimators)},
        "gate": {k: gate[k] for k in ("chosen", "deployed", "always_candidate", "oracle", "worst_regret_vs_deployed",
                                      "picked_right", "switched", "pooled", "per_shift")},
        "estimators": estimator_errors(shifts, {k: v[1] for k, v in estimated.items()}, list(soups)),
        "per_shift": {s.name: {"accuracy_target": s.accuracy_target, "estimates": estimated[s.name][1]} for s in shifts},
        "timings_s": {"logits": round(logits_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def superclass_logits(member: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """1000-way logits to LAION-C's superclass scores: log of each superclass's mean member probability (their
    arg-max is LAION-C's prediction, :func:`adaptsoup_bench.shiftsets.superclass_scorer`)."""
    counts = member.sum(dim=0).clamp(min=1)

    def convert(logits: torch.Tensor) -> torch.Tensor:
        return torch.log(((logits.float().softmax(dim=1) @ member) / counts).clamp_min(1e-12))

    return convert
