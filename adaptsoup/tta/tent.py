"""Tent (Wang et al., ICLR 2021): minimise the entropy of every prediction, updating every LayerNorm's affine
parameters, with SGD (momentum 0.9, its ImageNet setting) or Adam (lr 1e-3 at batch 200, its CIFAR setting)."""

from __future__ import annotations

import torch
from torch import nn

from adaptsoup.tta.entropy import softmax_entropy

TENT_BASE_LR_SGD = 2.5e-4  # per 64 images
TENT_BASE_LR_ADAM = 1e-3 / 200 * 64  # Tent's CIFAR Adam: 1e-3 at batch 200, per 64 images


def tent_modules(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LayerNorm of the model."""
    return [(n, m) for n, m in vit.named_modules() if isinstance(m, nn.LayerNorm)]


def tent_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One update on the mean entropy of the batch; returns the logits (made before the update) and the loss."""
    logits = model(x)
    loss = softmax_entropy(logits).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, float(loss.detach())
