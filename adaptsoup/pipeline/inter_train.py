"""Stage 1, inter-training: each run of the plan trains a copy of the stock on unlabeled images with a
self-supervised loss (or, for supervised partitions, on one group of source classes) and keeps the encoder
as ``inter/<run>.safetensors``.  Runs whose file exists, or whose ingredients all exist, are skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import ImageSet
from adaptsoup.core.models import model_meta
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.diversity import class_partitions, indices_of_classes
from adaptsoup.pipeline.inputs import strip_labels
from adaptsoup.pipeline.plan import InterRun, Plan
from adaptsoup.pipeline.shard import owns
from adaptsoup.pipeline.start import load_start, start_checkpoint
from adaptsoup.pipeline.warm_up import prepare_decoder, stock_decoder, warm_up_heads
from adaptsoup.ssl.registry import SSLSettings, ssl_loss
from adaptsoup.train.loop import TrainConfig, train
from adaptsoup.train.losses import LossFn, classification_loss


@dataclass
class Objective:
    """What one inter-training run optimises, and how the training loop feeds it."""

    module: nn.Module  # holds the encoder as ``.encoder``
    loss_fn: LossFn
    views: int
    augment: str
    description: str  # for the log


class SupervisedInter(nn.Module):
    """Inter-training with labels (partition soups): the classifier itself, under its own name ``encoder``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def inter_train(ctx: RunContext, plan: Plan) -> None:
    """Train every inter-training run that is still needed; record each in the manifest's ``inter``."""
    with ctx.timed("inter_train", accumulate=True):
        partitions = _partitions(ctx)
        decoder_state = stock_decoder(ctx)
        for run in plan.inters:
            if owns(ctx.shard, plan, run) and ctx.claim(f"inter.{run.name}", done=lambda: not _needed(ctx, plan, run)):
                inter_train_one(ctx, run, _data_of(ctx, run, partitions), decoder_state)


def inter_train_one(ctx: RunContext, run: InterRun, data: ImageSet, decoder_state) -> None:
    """One inter-training run, resumable from its state file; writes ``inter/<run>.safetensors`` (rank 0;
    the other ranks of a data-parallel run wait until it is written)."""
    cfg = ctx.cfg
    start = start_checkpoint(cfg, ctx.run_dir)
    encoder = load_start(cfg, start)
    if cfg.inter.noise_stage == "before_inter":
        ctx.add_noise(encoder, run.noise, run.name)
    objective = _objective(ctx, run, encoder, data, decoder_state)
    tcfg = TrainConfig(
        steps=run.steps, lr=run.lr, batch_size=run.batch_size or cfg.inter.batch_size, weight_decay=cfg.inter.weight_decay,
        warmup_frac=cfg.inter.warmup_frac, augment=objective.augment, seed=run.seed, precision=cfg.precision, device=cfg.device,
        checkpoint_every_s=cfg.checkpoint_every_s, views=objective.views,
    )
    where = f"source partition {run.partition}" if run.partition is not None else cfg.inter.data
    ctx.log(f"inter-train {run.name}: {objective.description} on {where} ({len(data)} images), lr {run.lr:g}, {run.steps} steps"
            + (f", noise x{run.noise:g} {cfg.inter.noise_stage}" if run.noise else ""))
    result = train(objective.module, objective.loss_fn, data, ctx.inputs.preprocess, tcfg, state_path=ctx.run_dir.state(run.name),
                   progress=ctx.progress, description=f"inter-train {run.name}", on_step=ctx.step_hook(run.name),
                   precision_memo=ctx.precision_memo)
    encoder = objective.module.encoder.cpu()
    out = ctx.run_dir.inter(run.name)
    meta = model_meta(encoder, made_by="adaptsoup adapt", stage="inter-train", ssl=run.ssl, parents=[str(start.path)], run=dataclasses.asdict(run))
    if ctx.world.is_main:
        save_checkpoint(out, encoder.state_dict(), meta)
        ctx.manifest.update("inter", run.name, {**dataclasses.asdict(run), "train": result.record(tcfg), "path": ctx.run_dir.relative(out)})
    ctx.written(f"inter.{run.name}")


def _objective(ctx: RunContext, run: InterRun, encoder: nn.Module, data: ImageSet, decoder_state) -> Objective:
    """The run's self-supervised loss from the registry, its decoder or heads made ready; or, for a
    supervised partition, the classifier's own loss."""
    cfg = ctx.cfg
    if run.partition is not None and cfg.inter.partition_loss == "supervised":
        return Objective(SupervisedInter(encoder), classification_loss(cfg.finetune.label_smoothing), 1, cfg.finetune.augment,
                         f"supervised on partition {run.partition}")
    loss = ssl_loss(run.ssl)
    settings = SSLSettings(mask_ratio=run.mask_ratio, decoder_depth=run.decoder_depth, norm_pix_loss=cfg.inter.norm_pix_loss,
                           temperature=run.temperature, lam=run.lam, views=cfg.inter.mmcr.views)
    with torch.random.fork_rng():
        # A fresh MAE decoder is warmed up once and shared by the runs of its size: its initialisation depends
        # on the recipe's seed alone.  Projection heads are each run's own.
        torch.manual_seed(cfg.seed if loss.adds == "decoder" else run.seed)
        module = loss.wrap(encoder, settings)
    views = loss.views(settings)
    if loss.adds == "decoder":
        prepare_decoder(ctx, module, run, decoder_state, data)
    else:
        warm_up_heads(ctx, module, run, views, data)
    augment = cfg.inter.augment if views == 1 else cfg.inter.contrastive_augment
    return Objective(module, loss.loss_fn, views, augment, loss.describe(settings))


def _needed(ctx: RunContext, plan: Plan, run: InterRun) -> bool:
    """A run is trained unless its encoder exists or every ingredient made from it does."""
    if ctx.run_dir.inter(run.name).is_file():
        return False
    return any(not ctx.run_dir.ingredient(ing.name).is_file() for ing in plan.ingredients_of(run))


def _partitions(ctx: RunContext) -> list[list[int]]:
    """The groups of source classes of partition soups (recorded in the manifest), or none."""
    inter = ctx.cfg.inter
    if not inter.partitions:
        return []
    partitions = class_partitions(ctx.deployed.num_classes, inter.partitions, inter.partition_mode, ctx.cfg.seed)
    ctx.manifest.data["partitions"] = {"mode": inter.partition_mode, "loss": inter.partition_loss, "classes": partitions}
    ctx.log(f"partitions: {len(partitions)} groups of source classes ({inter.partition_mode}), inter-training loss {inter.partition_loss}")
    return partitions


def _data_of(ctx: RunContext, run: InterRun, partitions: list[list[int]]) -> ImageSet:
    """The images ``run`` trains on: the inter-training data, or its partition of the source."""
    if run.partition is None:
        return ctx.inputs.inter_data(ctx.cfg)
    source = ctx.inputs.source
    subset = source.subset(indices_of_classes(source.labels, partitions[run.partition]))
    return subset if ctx.cfg.inter.partition_loss == "supervised" else strip_labels(subset)
