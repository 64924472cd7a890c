"""``adapt``: Self-Soupervision end to end (eq. 1 of the paper).

    soup = 1/(N·M) Σ_j Σ_i FineTune(InterTrain_MAE(stock, target_i), source_j, labels_j)

Stages, each a function of the run (:class:`~adaptsoup.pipeline.context.RunContext`) and the plan:

1. :func:`~adaptsoup.pipeline.inter_train.inter_train` — M copies of the stock trained with a self-supervised
   loss on the unlabeled target images; only the encoders are kept;
2. :func:`~adaptsoup.pipeline.finetune_back.finetune_back` — each encoder fine-tuned back on the labeled
   source N times with LP-FT (plus ``vanilla`` ingredients: the stock fine-tuned without inter-training);
3. :func:`~adaptsoup.pipeline.soups.uniform_soups` — the M·N ingredients averaged into ``soup.safetensors``
   (and the vanilla ones into the supervised soup);
4. :func:`~adaptsoup.pipeline.evaluate.evaluate` — top-1 on the ``--eval`` folders;
5. :func:`~adaptsoup.pipeline.soups.mixed_soups` — the recipe's ``mix`` methods;
6. :func:`~adaptsoup.pipeline.tta.adapt_at_test_time` — the recipe's ``tta`` on the last soup.

Every artefact is written atomically into the run directory, and every training run checkpoints its state,
so running again skips what is finished and continues what was cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptsoup.core.run_dir import SOUP, SUPERVISED_SOUP
from adaptsoup.pipeline.context import RunContext, open_run
from adaptsoup.pipeline.evaluate import evaluate
from adaptsoup.pipeline.finetune_back import finetune_back
from adaptsoup.pipeline.inter_train import inter_train
from adaptsoup.pipeline.plan import Plan, plan_run
from adaptsoup.pipeline.recipe import AdaptConfig
from adaptsoup.pipeline.soups import mixed_soups, uniform_soups
from adaptsoup.pipeline.tta import adapt_at_test_time


@dataclass
class AdaptResult:
    run_dir: Path
    soup_path: Path
    supervised_soup_path: Path | None
    ingredients: list[Path]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # eval folder -> model -> top-1
    manifest_path: Path | None = None
    mixes: dict[str, dict] = field(default_factory=dict)  # the recipe's mix methods -> their manifest records
    tta: dict | None = None  # the manifest's record of test-time adaptation


def run_adapt(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
              on_step: Callable[[str, int], None] | None = None) -> AdaptResult:
    """Run (or resume) an adapt job as configured; returns where everything was written."""
    ctx = open_run(cfg, progress=progress, echo=echo, command=command, on_step=on_step)
    plan = plan_adapt(ctx)
    inter_train(ctx, plan)
    finetune_back(ctx, plan)
    uniform_soups(ctx, plan)
    evaluate(ctx, plan)
    mixes = mixed_soups(ctx)
    tta = adapt_at_test_time(ctx)
    return finish(ctx, plan, mixes, tta)


def plan_adapt(ctx: RunContext) -> Plan:
    """The run's plan, from the recipe and the number of inter-training images; logged."""
    plan = plan_run(ctx.cfg, len(ctx.inputs.inter_data(ctx.cfg)))
    ctx.log(plan.summary(ctx.cfg.vanilla))
    return plan


def finish(ctx: RunContext, plan: Plan, mixes: dict, tta: dict | None) -> AdaptResult:
    """Mark the run complete in its manifest and say where everything is."""
    manifest = ctx.manifest
    manifest.data["timings_s"]["total_this_invocation"] = ctx.elapsed()
    manifest.data["status"] = "complete"
    manifest.save()
    soups = manifest.data["soups"]
    return AdaptResult(
        run_dir=ctx.run_dir.root, soup_path=ctx.run_dir.soup(SOUP),
        supervised_soup_path=ctx.run_dir.soup(SUPERVISED_SOUP) if SUPERVISED_SOUP in soups else None,
        ingredients=[ctx.run_dir.ingredient(ing.name) for ing in plan.of_kind("self") + plan.of_kind("vanilla")],
        metrics=manifest.data.get("metrics", {}), manifest_path=manifest.path, mixes=mixes, tta=tta,
    )
