"""The self-supervised losses inter-training can use, by name: ``mae``, ``mocov3``, ``mmcr``.

Each wraps the encoder in a module that :func:`adaptsoup.train.loop.train` optimises (the encoder plus an
MAE decoder or projection heads, which are thrown away afterwards) and says how the loop feeds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

from adaptsoup.errors import AdaptsoupError
from adaptsoup.ssl.mae import DecoderConfig, MaskedAutoencoder
from adaptsoup.ssl.mmcr import MMCR
from adaptsoup.ssl.mocov3 import MoCoV3
from adaptsoup.train.losses import LossFn, mae_loss, multiview_loss


@dataclass(frozen=True)
class SSLSettings:
    """The hyper-parameters of one inter-training run that the losses read (each reads its own)."""

    mask_ratio: float = 0.75  # MAE
    decoder_depth: int = 0  # MAE; 0: sized for the encoder
    norm_pix_loss: bool = True  # MAE
    temperature: float | None = 0.2  # MoCo v3
    lam: float | None = 0.0  # MMCR
    views: int = 4  # MMCR (MoCo v3 always takes 2)


@dataclass(frozen=True)
class InterTrainingLoss:
    name: str
    wrap: Callable[[nn.Module, SSLSettings], nn.Module]  # encoder -> the module train() optimises; its .encoder is the encoder
    loss_fn: LossFn
    views: Callable[[SSLSettings], int]  # augmented views per image and step (1: plain batches)
    describe: Callable[[SSLSettings], str]  # for the run log
    adds: Literal["decoder", "heads"]  # what the wrapper adds to the encoder: warmed up first, discarded after


def _mae(encoder: nn.Module, s: SSLSettings) -> MaskedAutoencoder:
    decoder = DecoderConfig.for_encoder(encoder.embed_dim)
    if s.decoder_depth:
        decoder = dataclasses.replace(decoder, depth=s.decoder_depth)
    return MaskedAutoencoder(encoder, decoder, mask_ratio=s.mask_ratio, norm_pix_loss=s.norm_pix_loss)


SSL_LOSSES: dict[str, InterTrainingLoss] = {
    "mae": InterTrainingLoss("mae", _mae, mae_loss, views=lambda s: 1, describe=lambda s: f"MAE, mask {s.mask_ratio}", adds="decoder"),
    "mocov3": InterTrainingLoss("mocov3", lambda encoder, s: MoCoV3(encoder, temperature=s.temperature), multiview_loss,
                                views=lambda s: 2, describe=lambda s: f"MoCo v3, tau {s.temperature}", adds="heads"),
    "mmcr": InterTrainingLoss("mmcr", lambda encoder, s: MMCR(encoder, lam=s.lam), multiview_loss,
                              views=lambda s: s.views, describe=lambda s: f"MMCR, lambda {s.lam}, {s.views} views", adds="heads"),
}


def ssl_loss(name: str) -> InterTrainingLoss:
    """The registered loss ``name``; an unknown name is an error that lists the known ones."""
    if name not in SSL_LOSSES:
        raise AdaptsoupError(f"unknown self-supervised loss {name!r}; available: {', '.join(SSL_LOSSES)}")
    return SSL_LOSSES[name]
