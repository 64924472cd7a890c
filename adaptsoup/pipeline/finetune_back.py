"""Stage 2, fine-tuning back: each ingredient of the plan is its inter-trained encoder (or, for vanilla
ingredients, the stock) fine-tuned on the labeled source with LP-FT, written as ``ingredients/<name>.safetensors``.
Without fine-tuning back, the inter-trained encoders themselves are the ingredients (under the pretrained
protocol: the deployed model plus each one's inter-training task vector).  Existing ingredients
are skipped.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.pipeline.context import RunContext
from adaptsoup.core.distributed import main_then_barrier
from adaptsoup.pipeline.plan import Ingredient, Plan
from adaptsoup.pipeline.shard import owns
from adaptsoup.pipeline.start import load_start, probe_parent, start_checkpoint
from adaptsoup.soup.task_vector import onto_deployed
from adaptsoup.train.loop import TrainConfig
from adaptsoup.train.lpft import LinearProbeConfig, cached_linear_probe, linear_probe_then_finetune
from adaptsoup.train.optim import steps_for_epochs


def finetune_back(ctx: RunContext, plan: Plan) -> None:
    """Make every ingredient that does not exist yet; record each in the manifest's ``ingredients``."""
    with ctx.timed("fine_tune", accumulate=True):
        task = ctx.progress.add_task("ingredients", total=len(plan.ingredients))
        for done, ing in enumerate(plan.ingredients, start=1):
            if (owns(ctx.shard, plan, ing) and ctx.on_main(lambda: _encoder_ready(ctx, ing))
                    and ctx.claim(f"ingredient.{ing.name}", done=ctx.run_dir.ingredient(ing.name).is_file)):
                if ing.finetune is None:
                    keep_encoder(ctx, ing)
                else:
                    finetune_one(ctx, ing)
            ctx.progress.update(task, completed=done)
        ctx.progress.remove_task(task)


def _encoder_ready(ctx: RunContext, ing: Ingredient) -> bool:
    """Whether the encoder ``ing`` starts from is on disk (the stock always is); one that another job is
    still inter-training leaves its ingredients to that job."""
    return ing.inter is None or ctx.run_dir.inter(ing.inter.name).is_file()


def keep_encoder(ctx: RunContext, ing: Ingredient) -> None:
    """A label-free ingredient: the inter-trained encoder as it is (noisy at ``before_finetune``/``before_mix``);
    under the pretrained protocol, the deployed model plus its inter-training's task vector instead."""
    start = start_checkpoint(ctx.cfg, ctx.run_dir, ing.inter)
    model = load_start(ctx.cfg, start)
    kind, parents = "ssl-only", [str(start.path)]
    if ctx.cfg.pretrained:
        model, kind = _with_task_vector(ctx, model), "task-vector"
        parents = [str(ctx.cfg.model), str(ctx.cfg.pretrained), str(start.path)]
    if ctx.cfg.inter.noise_stage in ("before_finetune", "before_mix"):
        ctx.add_noise(model, ing.inter.noise, ing.name)
    out = ctx.run_dir.ingredient(ing.name)
    if ctx.world.is_main:
        save_checkpoint(out, model.state_dict(), model_meta(model, made_by="adaptsoup adapt", stage="inter-train only", kind=kind,
                                                              parents=parents, inter=dataclasses.asdict(ing.inter),
                                                              task_vector_scale=ctx.cfg.task_vector_scale if ctx.cfg.pretrained else None))
        ctx.manifest.update("ingredients", ing.name, {"kind": kind, "inter": ing.inter.name, "finetune": None,
                                                      "path": ctx.run_dir.relative(out), "status": "done"})
    ctx.written(f"ingredient.{ing.name}")


def _with_task_vector(ctx: RunContext, inter_trained: nn.Module) -> nn.Module:
    """The deployed model + scale · (inter-trained − pretrained), head and buffers the deployed model's."""
    model = copy.deepcopy(ctx.deployed)
    model.load_state_dict(onto_deployed(ctx.deployed, ctx.cfg.pretrained, inter_trained.state_dict(), ctx.cfg.task_vector_scale))
    return model


def finetune_one(ctx: RunContext, ing: Ingredient) -> None:
    """LP-FT of one ingredient on the source, resumable from its state file."""
    cfg, ft = ctx.cfg, ctx.cfg.finetune
    noise_stage = cfg.inter.noise_stage
    start = start_checkpoint(cfg, ctx.run_dir, ing.inter)
    model = load_start(ctx.cfg, start)
    if noise_stage == "before_finetune" and ing.inter is not None:
        ctx.add_noise(model, ing.inter.noise, ing.inter.name)  # one seed per parent: its N fine-tunings share the noisy encoder
    source = ctx.inputs.source
    tcfg = TrainConfig(
        steps=ft.steps or steps_for_epochs(ft.epochs, len(source), ft.batch_size), lr=ing.finetune.lr, batch_size=ft.batch_size,
        weight_decay=ft.weight_decay, warmup_frac=ft.warmup_frac, augment=ft.augment, seed=_finetune_seed(ing),
        precision=cfg.precision, device=cfg.device, checkpoint_every_s=cfg.checkpoint_every_s,
    )
    parent = probe_parent(cfg, ing.inter)
    ctx.log(f"fine-tune {ing.name}: LP-FT on source, lr {ing.finetune.lr:g}, {tcfg.steps} steps")
    probe_cfg = LinearProbeConfig(weight_decay=ft.probe_weight_decay, device=cfg.device, bf16=cfg.precision == "bf16")
    on_probe = lambda p: ctx.log(f"linear probe on {parent}: train accuracy {p['train_acc']:.1f}% ({p['wall_s']:.0f}s)")  # noqa: E731
    if ctx.world.distributed:  # rank 0 fits (or finds) the probe; the others read its cached head
        with main_then_barrier() as main:
            if main:
                record, fitted = cached_linear_probe(model, source, ctx.inputs.preprocess, probe_cfg, ctx.run_dir.probe(parent))
                if fitted:
                    on_probe(record)
    probe, result = linear_probe_then_finetune(
        model, source, ctx.inputs.preprocess, probe_cfg, tcfg,
        label_smoothing=ft.label_smoothing, probe_cache=ctx.run_dir.probe(parent), state_path=ctx.run_dir.state(ing.name),
        progress=ctx.progress, description=f"fine-tune {ing.name}", on_step=ctx.step_hook(ing.name), on_probe=on_probe,
        precision_memo=ctx.precision_memo,
    )
    model.cpu()
    if noise_stage == "before_mix" and ing.inter is not None:
        ctx.add_noise(model, ing.inter.noise, ing.name)
    out = ctx.run_dir.ingredient(ing.name)
    meta = model_meta(model, made_by="adaptsoup adapt", stage="fine-tune", kind=ing.kind, parents=[str(start.path)],
                      finetune=dataclasses.asdict(ing.finetune), inter=dataclasses.asdict(ing.inter) if ing.inter else None)
    if ctx.world.is_main:
        save_checkpoint(out, model.state_dict(), meta)
        ctx.manifest.update("ingredients", ing.name, {
            "kind": ing.kind, "inter": ing.inter.name if ing.inter else None, "finetune": dataclasses.asdict(ing.finetune),
            "linear_probe": probe, "train": result.record(tcfg), "path": ctx.run_dir.relative(out), "status": "done",
            "noise": {"stage": noise_stage, "multiplier": ing.inter.noise} if (noise_stage and ing.inter) else None,
        })
    ctx.written(f"ingredient.{ing.name}")


def _finetune_seed(ing: Ingredient) -> int:
    """The fine-tuning's seed, offset by its parent inter-training run's (vanilla ingredients: not offset)."""
    return ing.finetune.seed + (1000 * (ing.inter.seed + 1) if ing.inter else 0)
