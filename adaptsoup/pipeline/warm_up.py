"""Before an inter-training run moves the encoder, what the self-supervised loss added to it is trained
alone, the encoder frozen: the MAE decoder (shared by the runs of one decoder size and mask ratio) or the
MoCo v3 / MMCR projection heads (one run's own).  Each is cached in ``inter/`` so a resumed run reuses it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.data import ImageSet
from adaptsoup.core.models import encoder_state_dict
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.context import RunContext
from adaptsoup.pipeline.plan import InterRun
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.train.loop import TrainConfig, train
from adaptsoup.train.losses import mae_loss, multiview_loss


def stock_decoder(ctx: RunContext) -> dict[str, torch.Tensor] | None:
    """The MAE decoder to start from: the pre-trained checkpoint's if it holds decoder keys (the encoder and
    decoder were trained together), else ``--stock``'s (the recipe's ``stock``), else None; the log says which."""
    if ctx.cfg.pretrained:
        state, _ = read_checkpoint(ctx.cfg.pretrained)
        if len(encoder_state_dict(state)) < len(state):
            ctx.log(f"MAE decoder: loaded from the pre-trained checkpoint {ctx.cfg.pretrained}")
            return state
    if not ctx.cfg.stock:
        ctx.log("MAE decoder: none given (--stock); a fresh decoder is warmed up with the encoder frozen")
        return None
    state, _ = read_checkpoint(ctx.cfg.stock)
    ctx.log(f"MAE decoder: loaded from {ctx.cfg.stock}")
    return state


def prepare_decoder(ctx: RunContext, mae: MaskedAutoencoder, run: InterRun, decoder_state, data: ImageSet) -> None:
    """Load the stock's MAE decoder, or warm up a fresh one (encoder frozen), shared by runs of one decoder size.
    With ``decoder_warmup_loaded`` the stock's decoder is warmed up the same way, starting from its weights."""
    inter = ctx.cfg.inter
    loaded = decoder_state is not None and _load_stock_decoder(ctx, mae, run, decoder_state)
    if loaded and not inter.decoder_warmup_loaded:
        return
    origin = "stock" if loaded else "fresh"
    warm = ctx.run_dir.decoder_warmup(origin, mae.decoder_config.depth, run.mask_ratio)
    if inter.decoder_warmup_steps <= 0:
        ctx.log("decoder warm-up disabled (decoder_warmup_steps = 0): inter-training starts from "
                + ("the stock's decoder as it is" if loaded else "a random decoder"))
        return
    if not ctx.claim(warm.stem, done=warm.is_file, wait=True):  # made already, or by the job this one waited for
        mae.load_decoder_state_dict(read_checkpoint(warm)[0])
        return
    tcfg = TrainConfig(steps=inter.decoder_warmup_steps, lr=inter.decoder_warmup_lr, batch_size=inter.batch_size, weight_decay=inter.weight_decay,
                       warmup_frac=0.1, augment=inter.augment, seed=ctx.cfg.seed, precision=ctx.cfg.precision, device=ctx.cfg.device,
                       checkpoint_every_s=ctx.cfg.checkpoint_every_s)
    ctx.log(f"decoder warm-up ({'from the stock decoder' if loaded else 'fresh decoder'}): {tcfg.steps} steps, lr {tcfg.lr:g}, encoder frozen")
    with frozen(mae.encoder):
        train(mae, mae_loss, data, ctx.inputs.preprocess, tcfg, state_path=ctx.run_dir.state(warm.stem),
              progress=ctx.progress, description="decoder warm-up", precision_memo=ctx.precision_memo)
    if ctx.world.is_main:
        save_checkpoint(warm, mae.decoder_state_dict(), None)
    ctx.written(warm.stem)


def _load_stock_decoder(ctx: RunContext, mae: MaskedAutoencoder, run: InterRun, decoder_state) -> bool:
    """Whether the stock's decoder fits this run; one that does not fit a non-default depth is replaced by a fresh one."""
    try:
        mae.load_decoder_state_dict(decoder_state)
        return True
    except AdaptsoupError as exc:
        if not run.decoder_depth:
            raise
        ctx.log(f"MAE decoder from --stock does not fit decoder depth {run.decoder_depth} ({exc}); warming up a fresh one")
        return False


def warm_up_heads(ctx: RunContext, module: nn.Module, run: InterRun, views: int, data: ImageSet) -> None:
    """MoCo v3 / MMCR: train the fresh projection heads alone (encoder frozen) for ``head_warmup_frac`` of the steps."""
    inter = ctx.cfg.inter
    steps = int(round(inter.head_warmup_frac * run.steps))
    if steps <= 0:
        return
    warm = ctx.run_dir.heads(run.name)
    if warm.is_file():
        module.load_state_dict({**module.state_dict(), **read_checkpoint(warm)[0]})
        return
    tcfg = TrainConfig(steps=steps, lr=run.lr, batch_size=run.batch_size or inter.batch_size, weight_decay=inter.weight_decay,
                       warmup_frac=0.0, augment=inter.contrastive_augment, seed=run.seed + 7, precision=ctx.cfg.precision, device=ctx.cfg.device,
                       checkpoint_every_s=ctx.cfg.checkpoint_every_s, views=views)
    ctx.log(f"{run.name}: head warm-up, {steps} steps with the encoder frozen")
    with frozen(module.encoder):
        train(module, multiview_loss, data, ctx.inputs.preprocess, tcfg, state_path=ctx.run_dir.state(warm.stem), progress=ctx.progress,
              description="head warm-up", precision_memo=ctx.precision_memo)
    if ctx.world.is_main:
        save_checkpoint(warm, {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}, None)
    ctx.written(warm.stem)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters take no gradient inside the block."""
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(True)
