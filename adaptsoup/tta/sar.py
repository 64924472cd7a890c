"""SAR (Niu et al., ICLR 2023), as in its official implementation with its known defects fixed (see
``shared/reference``):

* loss: softmax entropy of the reliable samples only — entropy below E0 = 0.4·ln C at the first forward
  and, among those, again at the second (perturbed) forward;
* sharpness-aware update (SAM, ρ = 0.05) around SGD with momentum 0.9: ascend to w + e(w) with the first
  gradient, take the filtered entropy there, descend from w with that second gradient;
* model recovery: ema ← 0.9·ema + 0.1·loss₂; below 0.2 the model and optimizer are reset to their initial
  state, and the moving average restarts (the reference forgets to restart it; the reset itself is the
  :class:`~adaptsoup.tta.adapter.Adapter`'s, which holds the initial state);
* parameters: affine weight and bias of the LayerNorms of all blocks but the top quarter (ViT-B/12:
  blocks 0–8), selected by module position, not by name (the reference's substring match lets ``fc_norm``
  through); the final ``norm``/``fc_norm`` are frozen;
* a step in which no sample passes the filter is skipped (the reference steps on an empty mean);
* the model stays in eval mode with gradients on (the reference's train mode turns on stochastic depth);
* predictions are the logits of the first forward, made before the batch's update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptsoup.tta.entropy import softmax_entropy

SAR_BASE_LR = 1e-3  # per 64 images


def sar_modules(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LayerNorms of the blocks below the top quarter (by position), and ``norm_pre`` if it is one."""
    depth = len(vit.blocks)
    keep = depth - math.ceil(depth / 4)
    modules = [(f"blocks.{i}.{n}", m) for i, blk in enumerate(vit.blocks) if i < keep
               for n, m in blk.named_modules() if isinstance(m, nn.LayerNorm)]
    if isinstance(getattr(vit, "norm_pre", None), nn.LayerNorm):
        modules.insert(0, ("norm_pre", vit.norm_pre))
    return modules


def reliable(entropy: torch.Tensor, e0: float) -> torch.Tensor:
    """SAR's filter: the samples whose entropy is below E0."""
    return entropy < e0


def update_ema(ema: float | None, loss: float, momentum: float = 0.9) -> float:
    """SAR's moving average of the second-forward loss (it starts at the first loss)."""
    return loss if ema is None else momentum * ema + (1 - momentum) * loss


@torch.no_grad()
def sam_ascend(params: list[nn.Parameter], rho: float) -> list[torch.Tensor]:
    """SAM's first step: w ← w + ρ·g/‖g‖ (global L2 norm over ``params``); returns copies of the weights before it."""
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return before
    norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    scale = rho / (norm + 1e-12)
    for p in params:
        if p.grad is not None:
            p.add_(p.grad * scale)
    return before


@torch.no_grad()
def sam_restore(params: list[nn.Parameter], before: list[torch.Tensor]) -> None:
    """Back to the weights :func:`sam_ascend` started from, exactly (a copy, not w + e − e)."""
    for p, w in zip(params, before):
        p.copy_(w)


@dataclass
class SARStep:
    """What one SAR step did: the batch's logits, how many samples passed each filter, the loss (None: no update)."""

    logits: torch.Tensor
    passed_first: int
    passed_second: int = 0
    loss: float | None = None


def sar_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], x: torch.Tensor,
             e0: float, rho: float) -> SARStep:
    """Filter by entropy, ascend to w + e(w), filter again, descend from w with the gradient taken there."""
    logits = model(x)
    ent = softmax_entropy(logits)
    first = reliable(ent, e0)
    step = SARStep(logits=logits, passed_first=int(first.sum()))
    optimizer.zero_grad(set_to_none=True)
    if not first.any():
        return step  # nothing reliable: no update (the reference would step on an empty mean)
    ent[first].mean().backward()
    weights = sam_ascend(params, rho)
    optimizer.zero_grad(set_to_none=True)
    ent2 = softmax_entropy(model(x[first]))  # per-sample in eval mode: the reliable ones are all it needs
    second = reliable(ent2, e0)
    step.passed_second = int(second.sum())
    if not second.any():
        sam_restore(params, weights)
        return step
    loss2 = ent2[second].mean()
    loss2.backward()
    sam_restore(params, weights)
    optimizer.step()  # descend from w with the gradient taken at w + e(w)
    optimizer.zero_grad(set_to_none=True)
    step.loss = float(loss2.detach())
    return step
