"""The loss functions :func:`adaptsoup.train.loop.train` minimises: ``loss_fn(module, images, labels)``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]


def classification_loss(label_smoothing: float = 0.1) -> LossFn:
    """Cross-entropy of ``module(images)`` against the labels, with label smoothing (fine-tuning)."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("fine-tuning needs labels")
        return criterion(model(x).float(), y)

    return loss_fn


def mae_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """A :class:`~adaptsoup.ssl.mae.MaskedAutoencoder`'s reconstruction loss (labels unused)."""
    loss, _, _ = module(x)
    return loss


def multiview_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """MoCo v3 / MMCR: the module returns its loss on views ``x`` [V, B, C, H, W] (labels unused)."""
    return module(x)
