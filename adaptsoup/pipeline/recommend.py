"""Stage 7, the deploy recommendation: every model the run made, and the deployed one, estimated on the
target without labels (:mod:`adaptsoup.estimate`), and the conservative rule's choice of what to deploy.

The candidates are the soups (uniform, supervised, each ``mix``); the ingredients only join
agreement-on-the-line's pool.  Each model is run once over the target and the validation images (one in
memory at a time; only logits are kept).  Where the target folder holds several shifts (subfolders with
at least ``MIN_SUBFOLDER_IMAGES`` images each), the estimates and the decision are made for each as well
as pooled: a candidate can win on the pool and lose on one shift.  The manifest gets ``estimates`` and
``recommendation``; ``export RUN`` exports what it recommends.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from adaptsoup.core.data import ImageSet
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import class_names, load_model
from adaptsoup.core.run_dir import DEPLOYED, SOUP, SUPERVISED_SOUP
from adaptsoup.estimate import DecisionConfig, EstimateConfig, estimate_and_recommend
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.plan import Plan

MIN_SUBFOLDER_IMAGES = 50  # a shift's estimate on fewer images is noise


def candidate_paths(ctx: RunContext) -> dict[str, Path]:
    """The deployable models the run made, by the name the manifest and the log use."""
    soups = ctx.manifest.data.get("soups", {})
    out = {name: ctx.run_dir.soup(name) for name in (SOUP, SUPERVISED_SOUP) if name in soups}
    for method, record in ctx.manifest.data.get("mixes", {}).items():
        if record.get("path"):
            out[f"mix:{method}"] = ctx.run_dir.root / record["path"]
    return {name: path for name, path in out.items() if path.is_file()}


def shifts_of(target: ImageSet, class_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The target's subfolders (first level under its root) with enough images each, as index tensors; {} when
    the target is one folder, a single subfolder, or a folder per class (every subfolder named after one of
    ``class_names``: those are not shifts)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(target.paths):  # relative to the target folder
        parts = Path(path).parts
        if len(parts) > 1:
            groups[parts[0]].append(i)
    if class_names and groups and set(groups) <= set(class_names):
        return {}
    kept = {name: torch.tensor(idx) for name, idx in sorted(groups.items()) if len(idx) >= MIN_SUBFOLDER_IMAGES}
    return kept if len(kept) >= 2 else {}


def recommend_deployment(ctx: RunContext, plan: Plan, decision: DecisionConfig = DecisionConfig()) -> dict | None:
    """Estimate every model, recommend one (pooled and per shift); recorded in the manifest and the log."""
    inputs = ctx.inputs
    if inputs.validation is None:
        ctx.log(f"no label-free estimates and no deploy recommendation: no validation images ({inputs.validation_origin}); "
                "give --validation DIR (labeled in-distribution images no model trained on)")
        ctx.manifest.data["recommendation"] = None
        ctx.manifest.save()
        return None
    with ctx.timed("estimate"):
        candidates = candidate_paths(ctx)
        pool = {DEPLOYED: Path(ctx.cfg.model), **candidates,
                **{f"ingredient:{ing.name}": ctx.run_dir.ingredient(ing.name) for ing in plan.ingredients}}
        ctx.log(f"label-free estimates of {len(pool)} models on {len(inputs.target)} target images; validation: {inputs.validation_origin}")
        target_logits, validation_logits = _logits(ctx, pool)

        def run(idx: torch.Tensor | None = None) -> dict:
            """The estimates and the recommendation on the target images ``idx`` (all of them: None)."""
            target = target_logits if idx is None else {m: v[idx] for m, v in target_logits.items()}
            return estimate_and_recommend(target, validation_logits, inputs.validation.labels, DEPLOYED,
                                          EstimateConfig(seed=ctx.cfg.seed), decision, candidates=list(candidates))

        pooled = run()
        shifts = shifts_of(inputs.target, class_names(ctx.deployed))
        per_shift = {name: run(idx)["recommendation"] for name, idx in shifts.items()}
    rec = pooled["recommendation"]
    record = {**rec, "path": str(pool[rec["model"]]) if rec["model"] == DEPLOYED else ctx.run_dir.relative(pool[rec["model"]]),
              "per_shift": {name: {k: r[k] for k in ("model", "switch", "gain", "ci95", "reason")} for name, r in per_shift.items()},
              "validation": inputs.validation_origin,
              "candidate_paths": {name: ctx.run_dir.relative(path) for name, path in candidates.items()}}
    ctx.manifest.data["estimates"] = {k: v for k, v in pooled.items() if k != "recommendation"}
    ctx.manifest.data["recommendation"] = record
    ctx.manifest.save()
    _log(ctx, pooled, record)
    return record


def _logits(ctx: RunContext, pool: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cfg, inputs = ctx.cfg, ctx.inputs
    target, validation = {}, {}
    task = ctx.progress.add_task("estimate", total=len(pool))
    for name, path in pool.items():
        model = load_model(cfg.arch if name == DEPLOYED else None, path)
        for out, images in ((target, inputs.target), (validation, inputs.validation)):
            out[name] = run_model(model, images, inputs.preprocess, device=cfg.device, bf16=cfg.precision == "bf16").logits
        del model
        ctx.progress.advance(task)
    ctx.progress.remove_task(task)
    return target, validation


def _log(ctx: RunContext, pooled: dict, record: dict) -> None:
    for name, row in pooled["estimates"].items():
        if not name.startswith("ingredient:"):
            shown = ", ".join(f"{e} {'—' if v is None else f'{v:.1f}'}" for e, v in row.items())
            ctx.log(f"estimated accuracy of {name} on the target: {shown}")
    if record["switch"]:
        ctx.log(f"recommendation: deploy {record['model']} ({record['path']}), estimated gain {record['gain']:+.2f} points "
                f"[{record['ci95'][0]:+.2f}, {record['ci95'][1]:+.2f}] over the deployed model: {record['reason']}")
    else:
        ctx.log(f"recommendation: keep the deployed model: {record['reason']}")
    for name, r in record["per_shift"].items():
        ctx.log(f"  shift {name}: " + (f"deploy {r['model']} ({r['gain']:+.2f})" if r["switch"] else "keep the deployed model"))
