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
6. :func:`~adaptsoup.pipeline.tta.adapt_at_test_time` — the recipe's ``tta`` on the last soup;
7. :func:`~adaptsoup.pipeline.recommend.recommend_deployment` — label-free estimates of every model on the
   target and the conservative deploy recommendation (pooled, and per target subfolder).

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
from adaptsoup.pipeline.recommend import recommend_deployment
from adaptsoup.pipeline.claims import FINISH
from adaptsoup.pipeline.shard import Shard
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
    recommendation: dict | None = None  # the manifest's deploy recommendation (None: no validation images)


def run_adapt(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
              on_step: Callable[[str, int], None] | None = None, shard: Shard | None = None) -> AdaptResult:
    """Run (or resume) an adapt job as configured (its ``shard`` of the grid only, if given); returns where
    everything was written.  Under torchrun, the soups, evaluation, mixing and TTA run on rank 0 while the
    other ranks wait.  Units that another live job is making are left to it (see :mod:`~adaptsoup.pipeline.claims`)."""
    ctx = open_run(cfg, progress=progress, echo=echo, command=command, on_step=on_step, shard=shard)
    try:
        return _run_stages(ctx)
    finally:
        ctx.close()


def _run_stages(ctx: RunContext) -> AdaptResult:
    plan = plan_adapt(ctx)
    inter_train(ctx, plan)
    finetune_back(ctx, plan)
    missing = ctx.on_main(lambda: [ing.name for ing in plan.ingredients if not ctx.run_dir.ingredient(ing.name).is_file()])
    if missing:
        return shard_done(ctx, plan, missing)
    finished_before = (lambda: ctx.claims.is_done(FINISH)) if ctx.shard is not None else None  # --resume may always finish again
    if not ctx.claim(FINISH, done=finished_before):
        return already_finished(ctx, plan) if ctx.on_main(lambda: ctx.claims.is_done(FINISH)) else shard_done(ctx, plan, [])
    with main_then_barrier() as main:
        if main:
            uniform_soups(ctx, plan)
            evaluate(ctx, plan)
            mixes = mixed_soups(ctx)
            tta = adapt_at_test_time(ctx)
            recommend_deployment(ctx, plan)
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
    """A job whose part of the grid is made but that does not write the soups: other jobs' ingredients are
    still missing, or another job is writing the soups."""
    label = ctx.job_label
    who = f"shard {label}" if ctx.shard else "this job"
    if missing:
        others = f" ({', '.join(ctx.left_to_others)} left to live jobs)" if ctx.left_to_others else ""
        ctx.log(f"{who}: its part of the grid is done; {len(missing)} of {len(plan.ingredients)} ingredients are other jobs' "
                f"to make{others}; the last job to finish (or adapt --resume {ctx.run_dir.root}) writes the soups")
    else:
        ctx.log(f"{who}: its part of the grid is done; the soups are another job's to write")
    if ctx.world.is_main:
        ctx.manifest.data.setdefault("shards", {}).setdefault(label, {}).update(status="done", wall_s=round(ctx.elapsed(), 2))
        ctx.manifest.data.setdefault("status", "partial")
        ctx.manifest.save()
    result = finish(ctx, plan, {}, None, complete=False)
    result.missing = missing
    return result


def already_finished(ctx: RunContext, plan: Plan) -> AdaptResult:
    """A shard that finds the run finished (a requeued array task): nothing is made or written again."""
    ctx.log(f"shard {ctx.job_label}: the run is complete (the soups were written by an earlier job); nothing to do")
    ctx.reload_manifest()
    mixes = ctx.manifest.data.get("mixes", {})
    return finish(ctx, plan, {m: mixes[m] for m in ctx.cfg.mix if m in mixes}, ctx.manifest.data.get("tta"), record=False)


def finish(ctx: RunContext, plan: Plan, mixes: dict, tta: dict | None, *, complete: bool = True, record: bool = True) -> AdaptResult:
    """Mark the run complete in its manifest (rank 0; ``record`` False: it already is) and say where everything is."""
    manifest = ctx.manifest
    if complete and record and ctx.world.is_main:
        manifest.data["timings_s"]["total_this_invocation"] = ctx.elapsed()
        manifest.data["status"] = "complete"
        if ctx.shard is not None:
            manifest.data["shards"][ctx.shard.label].update(status="done, wrote the soups", wall_s=round(ctx.elapsed(), 2))
        manifest.save()
        ctx.claims.mark_done(FINISH)
    soups = manifest.data.get("soups", {})
    return AdaptResult(
        run_dir=ctx.run_dir.root, soup_path=ctx.run_dir.soup(SOUP),
        supervised_soup_path=ctx.run_dir.soup(SUPERVISED_SOUP) if SUPERVISED_SOUP in soups else None,
        ingredients=[ctx.run_dir.ingredient(ing.name) for ing in plan.of_kind("self") + plan.of_kind("vanilla")],
        metrics=manifest.data.get("metrics", {}), manifest_path=manifest.path, mixes=mixes, tta=tta, complete=complete,
        recommendation=manifest.data.get("recommendation"),
    )
