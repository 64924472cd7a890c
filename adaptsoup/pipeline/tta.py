"""Stage 6, test-time adaptation: SAR, Tent, EATA or ROID on the soup over the target stream, stacked after mixing —
on the soup of the last ``mix`` method, or on the uniform soup when nothing was mixed."""

from __future__ import annotations

from adaptsoup.core.run_dir import SOUP
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.recipe import AdaptConfig
from adaptsoup.tta.adapter import TTAConfig
from adaptsoup.tta.stream import tta_run_dir


def soup_to_adapt(cfg: AdaptConfig) -> str:
    """The name of the soup test-time adaptation starts from: the last mixed one, else the uniform soup."""
    return cfg.mix[-1] if cfg.mix else SOUP


def adapt_at_test_time(ctx: RunContext) -> dict | None:
    """Adapt the soup into ``tta/`` (online predictions, adapted checkpoint, manifest); recorded as the
    run manifest's ``tta``.  None when the recipe asks for no TTA."""
    cfg = ctx.cfg
    if cfg.tta is None:
        return None
    soup = soup_to_adapt(cfg)
    model = ctx.run_dir.soup(soup)
    ctx.log(f"test-time adaptation: {cfg.tta} on the {soup} soup ({ctx.run_dir.relative(model)}) over the target")
    # EATA's Fisher term is computed on the source images (labels unused); without a source it runs as ETA
    tta_cfg = TTAConfig(method=cfg.tta, batch_size=cfg.tta_batch_size, base_lr=cfg.tta_base_lr, guard=cfg.tta_guard, device=cfg.device,
                        fisher_images=cfg.source if cfg.tta == "eata" and cfg.source else None)
    with ctx.timed("tta"):
        summary = tta_run_dir(str(model), str(ctx.run_dir.tta), tta_cfg, target=cfg.target, progress=ctx.progress, log=ctx.log)
        record = {"soup": soup, "model": ctx.run_dir.relative(model), "adapted": ctx.run_dir.relative(ctx.run_dir.tta / "adapted.safetensors"),
                  **{k: v for k, v in summary.items() if k != "per_batch"}}
        ctx.manifest.data["tta"] = record
    return record
