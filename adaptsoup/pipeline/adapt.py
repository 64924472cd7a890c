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
so running again skips what is finished and continues what was cut off.  Under ``torchrun`` each training
run is data-parallel (rank 0 writes); with ``shard`` the job makes its part of the grid only
(:mod:`~adaptsoup.pipeline.shard`), and whichever job finds the grid complete writes the soups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptsoup.core.distributed import main_then_barrier
from adaptsoup.core.run_dir import SOUP, SUPERVISED_SOUP
from adaptsoup.pipeline.context import RunContext, open_run
from adaptsoup.pipeline.evaluate import evaluate
from adaptsoup.pipeline.finetune_back import finetune_back
from adaptsoup.pipeline.inter_train import inter_train
from adaptsoup.pipeline.plan import Plan, plan_run
from adaptsoup.pipeline.recipe import AdaptConfig
from adaptsoup.pipeline.shard import FINISH, Shard, release
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
    complete: bool = True  # False: a shard's part is done but other shards' ingredients are missing (no soup yet)
    missing: list[str] = field(default_factory=list)  # those ingredients


def run_adapt(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
              on_step: Callable[[str, int], None] | None = None, shard: Shard | None = None) -> AdaptResult:
    """Run (or resume) an adapt job as configured (its ``shard`` of the grid only, if given); returns where
    everything was written.  Under torchrun, the soups, evaluation, mixing and TTA run on rank 0 while the
    other ranks wait."""
    ctx = open_run(cfg, progress=progress, echo=echo, command=command, on_step=on_step, shard=shard)
    plan = plan_adapt(ctx)
    inter_train(ctx, plan)
    finetune_back(ctx, plan)
    missing = [ing.name for ing in plan.ingredients if not ctx.run_dir.ingredient(ing.name).is_file()]
    if missing or (shard is not None and not ctx.claim(FINISH)):
        return shard_done(ctx, plan, missing)
    with main_then_barrier() as main:
        if main:
            uniform_soups(ctx, plan)
            evaluate(ctx, plan)
            mixes = mixed_soups(ctx)
            tta = adapt_at_test_time(ctx)
            result = finish(ctx, plan, mixes, tta)
    if not main:
        ctx.reload_manifest()
        result = finish(ctx, plan, {}, None)
    return result


def plan_adapt(ctx: RunContext) -> Plan:
    """The run's plan, from the recipe and the number of inter-training images; logged."""
    plan = plan_run(ctx.cfg, len(ctx.inputs.inter_data(ctx.cfg)))
    ctx.log(plan.summary(ctx.cfg.vanilla))
    return plan


def shard_done(ctx: RunContext, plan: Plan, missing: list[str]) -> AdaptResult:
    """A shard whose part is made but that does not write the soups: other shards' ingredients are still
    missing, or another job is writing them."""
    label = ctx.job_label
    if missing:
        ctx.log(f"shard {label}: its part of the grid is done; {len(missing)} of {len(plan.ingredients)} ingredients are other "
                f"shards' to make; the last shard to finish (or adapt --resume {ctx.run_dir.root}) writes the soups")
    else:
        ctx.log(f"shard {label}: its part of the grid is done; the soups are another job's to write")
    ctx.manifest.data.setdefault("shards", {}).setdefault(label, {}).update(status="done", wall_s=round(ctx.elapsed(), 2))
    ctx.manifest.data.setdefault("status", "partial")
    ctx.manifest.save()
    result = finish(ctx, plan, {}, None, complete=False)
    result.missing = missing
    return result


def finish(ctx: RunContext, plan: Plan, mixes: dict, tta: dict | None, *, complete: bool = True) -> AdaptResult:
    """Mark the run complete in its manifest and say where everything is."""
    manifest = ctx.manifest
    if complete:
        manifest.data["timings_s"]["total_this_invocation"] = ctx.elapsed()
        manifest.data["status"] = "complete"
        if ctx.shard is not None:
            manifest.data["shards"][ctx.shard.label].update(status="done, wrote the soups", wall_s=round(ctx.elapsed(), 2))
            release(ctx.run_dir.root, FINISH)
        manifest.save()
    soups = manifest.data.get("soups", {})
    return AdaptResult(
        run_dir=ctx.run_dir.root, soup_path=ctx.run_dir.soup(SOUP),
        supervised_soup_path=ctx.run_dir.soup(SUPERVISED_SOUP) if SUPERVISED_SOUP in soups else None,
        ingredients=[ctx.run_dir.ingredient(ing.name) for ing in plan.of_kind("self") + plan.of_kind("vanilla")],
        metrics=manifest.data.get("metrics", {}), manifest_path=manifest.path, mixes=mixes, tta=tta, complete=complete,
    )
