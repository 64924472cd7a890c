"""Stage 3, soups: the uniform Self-Soup of the self ingredients (``soup.safetensors``) and the supervised
soup of the vanilla ones; then the recipe's ``mix`` methods, each a soup in ``soups/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.core.run_dir import SOUP, SUPERVISED_SOUP
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.plan import Plan
from adaptsoup.soup import methods as mixing_methods
from adaptsoup.soup.average import stream_weighted_average
from adaptsoup.soup.run import MixRequest, mix_run


def uniform_soups(ctx: RunContext, plan: Plan) -> None:
    """Average the self ingredients into the Self-Soup and the vanilla ones into the supervised soup."""
    with ctx.timed("soup"):
        soups = {}
        for name, kind in ((SOUP, "self"), (SUPERVISED_SOUP, "vanilla")):
            paths = [ctx.run_dir.ingredient(ing.name) for ing in plan.of_kind(kind)]
            if paths:
                out = write_soup(ctx.run_dir.soup(name), paths, ctx.deployed, method="uniform")
                soups[name] = {"path": ctx.run_dir.relative(out), "method": "uniform", "ingredients": [p.stem for p in paths]}
        ctx.manifest.data["soups"] = soups
    ctx.log(f"soup of {len(soups[SOUP]['ingredients'])} ingredients -> {ctx.run_dir.soup()}")


def write_soup(out: Path, paths: list[Path], stock: nn.Module, method: str = "uniform", weights=None) -> Path:
    """The (weighted) average of the checkpoints ``paths``, streamed, with soup provenance in its metadata."""
    state, meta = stream_weighted_average(paths, weights)
    base = meta or model_meta(stock)
    meta = dataclasses.replace(base, provenance={"made_by": "adaptsoup", "stage": "soup", "method": method,
                                                 "parents": [p.name for p in paths], "weights": None if weights is None else [float(w) for w in weights]})
    return save_checkpoint(out, state, meta)


def mixed_soups(ctx: RunContext) -> dict:
    """The recipe's ``mix`` methods on the self ingredients (``adaptsoup mix``); returns their records."""
    cfg = ctx.cfg
    if not cfg.mix:
        return {}
    ctx.manifest.save()  # mix_run reads and writes the manifest itself
    request = MixRequest(run_dir=ctx.run_dir.root, methods=list(cfg.mix), labeled=cfg.mix_labeled,
                         options={m: mixing_methods.get(m).options_from({"bf16": cfg.precision == "bf16"}) for m in dict.fromkeys(cfg.mix)},
                         device=cfg.device)
    mixes = mix_run(request, progress=ctx.progress, log=ctx.log)
    ctx.reload_manifest()
    return {method: mixes[method] for method in cfg.mix}
