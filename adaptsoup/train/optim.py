"""The optimiser and schedule every training run uses: AdamW, linear warm-up then cosine (timm's).

Weight decay follows the two reference recipes the paper follows:

* MAE pre-training (``add_weight_decay(model, wd)``, no skip list): no decay on 1-D parameters (biases, norm
  weights) and ``*.bias``; everything else decays, tokens included.  This is what the inter-training
  wrappers (MAE, MoCo v3, MMCR) get: they declare no ``no_weight_decay()``, so ``mask_token``,
  ``encoder.cls_token`` and ``encoder.pos_embed`` decay as MAE's ``mask_token`` and ``cls_token`` do.
* MAE fine-tuning (and timm): the same, plus the names in the module's own ``no_weight_decay()``.  Fine-tuning
  trains a timm ViT directly, whose list is ``pos_embed``, ``cls_token`` and ``dist_token``: they do not decay.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """timm's parameter groups of the trainable parameters: undecayed, then decayed (see the module docstring)."""
    listed = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=listed)
    return [g for g in groups if g["params"]]


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay."""
    (undecayed,) = [g for g in weight_decay_groups(module, 1.0) if g["weight_decay"] == 0.0] or [{"params": []}]
    ids = {id(p) for p in undecayed["params"]}
    return {name for name, p in module.named_parameters() if id(p) in ids}


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in :func:`weight_decay_groups`."""
    groups = weight_decay_groups(module, weight_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, lr: float, warmup_frac: float, min_lr_ratio: float) -> CosineLRScheduler:
    """timm's cosine schedule in optimizer steps, with linear warm-up over ``warmup_frac`` of them."""
    warmup = int(round(warmup_frac * steps))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, steps - warmup),
        lr_min=lr * min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def steps_for_epochs(epochs: float, num_images: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_images`` (at least one)."""
    return max(1, int(math.ceil(epochs * num_images / max(1, min(batch_size, num_images)))))
