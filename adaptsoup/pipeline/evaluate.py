"""Stage 4, evaluation: top-1 of the deployed model, every ingredient and the soups on each ``--eval``
folder, into the manifest's ``metrics`` (scores already there are kept)."""

from __future__ import annotations

from pathlib import Path

from adaptsoup.core.evaluation import evaluate_checkpoints
from adaptsoup.core.run_dir import DEPLOYED, SOUP, SUPERVISED_SOUP
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.plan import Plan


def evaluate(ctx: RunContext, plan: Plan) -> dict[str, dict[str, float]]:
    """``{eval folder: {model: top-1}}`` for the deployed model, the ingredients and the uniform soups."""
    cfg = ctx.cfg
    with ctx.timed("evaluate"):
        metrics = ctx.manifest.data.get("metrics", {})
        if ctx.inputs.evals:
            candidates = {DEPLOYED: Path(cfg.model), **{ing.name: ctx.run_dir.ingredient(ing.name) for ing in plan.ingredients}}
            candidates.update({name: ctx.run_dir.soup(name) for name in (SOUP, SUPERVISED_SOUP) if name in ctx.manifest.data["soups"]})
            metrics = evaluate_checkpoints(candidates, ctx.inputs.evals, ctx.inputs.preprocess, arches={DEPLOYED: cfg.arch},
                                           device=cfg.device, bf16=cfg.precision == "bf16", progress=ctx.progress, known=metrics)
            ctx.manifest.data["metrics"] = metrics
    return metrics
