"""EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting"), as in its official
code: ``forward_and_adapt_eata`` and the Fisher loop of ``main.py`` in mr-eggplant/EATA, with the LayerNorm
parameters its authors adapt on ViTs (mr-eggplant/SAR ``eata.py``/``main.py``):

* reliable samples: entropy below E0 = 0.4·ln C (``e0_factor``, shared with SAR);
* non-redundant samples: among the reliable ones, those whose softmax has |cosine similarity| below ε
  (``d_margin``, 0.05 in the official ImageNet code) to ``m``, a moving average of the probability vectors of
  the samples selected so far (m ← 0.9·m + 0.1·mean of the batch's selected ones). On the first batch there is
  no ``m`` yet: every reliable sample is selected and ``m`` starts at their mean. The cosine of two probability
  vectors grows as the class count falls (a confident sample against a uniform ``m`` over 10 classes: 0.32), so
  small label sets need a larger ε: mariodoebler/test-time-adaptation uses 0.4 for CIFAR-10, 0.1 for CIFAR-100;
* loss: the mean over the selected samples of entropy / exp(entropy − E0) (the weight is held constant);
* anti-forgetting: + β·Σ F·(θ − θ₀)² (β = ``fisher_alpha``, 2000), with F the diagonal Fisher information,
  computed once before adaptation from in-distribution images: for each batch the squared gradient of the
  cross-entropy against the model's own predictions (the official code overwrites any labels with them),
  averaged over the batches; θ₀ the weights before adaptation. Without such images — or with β = 0 — the
  method is ETA, EATA without its anti-forgetting term (the run's log and manifest say so);
* parameters: the affine weight and bias of every LayerNorm (the authors' ViT setting), SGD with momentum 0.9
  at base_lr 1e-3 per 64 images (their ``vitbase_timm`` learning rate), or Adam (1e-3 at batch 200,
  mariodoebler/test-time-adaptation's CIFAR setting, where β = 1 and ε = 0.4);
* a batch in which no sample is selected makes no update (as the official code);
* predictions are the logits of the forward pass, made before the batch's update.

Two choices where the official code is silent or accidental: a reset (``--episodic``) also forgets ``m``
(as mariodoebler's port does; the original keeps it), and the model adapts in eval mode (the original's train
mode only matters for dropout and stochastic depth, which the timm ViTs have off by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from adaptsoup.tta.entropy import softmax_entropy

EATA_BASE_LR = 1e-3  # per 64 images, SGD: mr-eggplant/SAR main.py's lr for vitbase_timm, used for EATA too
PROBS_MOMENTUM = 0.9  # the moving average of the selected samples' probabilities

Fisher = dict[str, tuple[torch.Tensor, torch.Tensor]]  # parameter name -> (diagonal Fisher F, anchor θ₀)


@torch.enable_grad()
def fisher_information(model: nn.Module, named_params: list[tuple[str, nn.Parameter]],
                       batches: Iterable[torch.Tensor]) -> tuple[Fisher | None, int]:
    """The diagonal Fisher of ``named_params`` over ``batches`` of in-distribution inputs, and the weights it
    anchors to: per batch, the squared gradient of the mean cross-entropy against the model's own argmax;
    the average over batches.  Returns it (None when there are no batches) and the number of images."""
    total = {name: torch.zeros_like(p) for name, p in named_params}
    count = images = 0
    for x in batches:
        for _, p in named_params:
            p.grad = None
        logits = model(x)
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        for name, p in named_params:
            if p.grad is not None:
                total[name] += p.grad.detach() ** 2
        count += 1
        images += len(x)
    for _, p in named_params:
        p.grad = None
    if count == 0:
        return None, 0
    return {name: (total[name] / count, p.detach().clone()) for name, p in named_params}, images


def select(logits: torch.Tensor, e0: float, probs_ema: torch.Tensor | None,
           d_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EATA's two filters as masks over the batch: ``reliable`` (entropy < E0) and ``selected`` (reliable and,
    once there is a moving average, |cos(softmax, m)| < ε)."""
    reliable = softmax_entropy(logits) < e0
    if probs_ema is None:
        return reliable, reliable.clone()
    cosine = F.cosine_similarity(probs_ema.unsqueeze(0), logits.detach().softmax(dim=1), dim=1)
    return reliable, reliable & (cosine.abs() < d_margin)


def update_probs(probs_ema: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor | None:
    """m ← 0.9·m + 0.1·mean(probs) over the batch's selected samples; the first selected batch starts it;
    a batch with none leaves it as it was."""
    if len(probs) == 0:
        return probs_ema
    mean = probs.detach().mean(dim=0)
    return mean if probs_ema is None else PROBS_MOMENTUM * probs_ema + (1 - PROBS_MOMENTUM) * mean


def sample_weights(entropy: torch.Tensor, e0: float) -> torch.Tensor:
    """1 / exp(entropy − E0): confident samples count more (a constant, no gradient flows through it)."""
    return 1 / torch.exp(entropy.detach() - e0)


def fisher_penalty(named_params: list[tuple[str, nn.Parameter]], fisher: Fisher, alpha: float) -> torch.Tensor:
    """β·Σ F·(θ − θ₀)², the anti-forgetting term, summed parameter by parameter."""
    penalty = torch.zeros((), device=named_params[0][1].device)
    for name, p in named_params:
        if name in fisher:
            weight, anchor = fisher[name]
            penalty = penalty + alpha * (weight * (p - anchor) ** 2).sum()
    return penalty


@dataclass
class EATAStep:
    """What one EATA step did: the batch's logits, the samples passing each filter, the loss (None: no update)."""

    logits: torch.Tensor
    passed_first: int
    passed_second: int
    loss: float | None = None


class EATA:
    """EATA's state between batches: the moving average ``m``, the Fisher term (None: ETA), its settings."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], e0: float, d_margin: float,
                 fisher: Fisher | None, fisher_alpha: float, fisher_images: int = 0) -> None:
        self.named_params = named_params
        self.e0 = e0
        self.d_margin = d_margin
        self.fisher = fisher if fisher_alpha > 0 else None
        self.fisher_alpha = fisher_alpha
        self.fisher_images = fisher_images if self.fisher is not None else 0
        self.probs_ema: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the moving average (the Fisher term is the source model's and stays)."""
        self.probs_ema = None

    def describe(self) -> dict:
        """What the manifest records: ETA or EATA, and the settings that made it."""
        return {"variant": "eata" if self.fisher is not None else "eta", "fisher_images": self.fisher_images,
                "fisher_alpha": self.fisher_alpha, "d_margin": self.d_margin}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> EATAStep:
        """Forward, filter, reweight, add the Fisher term, and step when any sample is selected."""
        logits = model(x)
        entropy = softmax_entropy(logits)
        reliable, selected = select(logits, self.e0, self.probs_ema, self.d_margin)
        self.probs_ema = update_probs(self.probs_ema, logits[selected].softmax(dim=1))
        step = EATAStep(logits=logits, passed_first=int(reliable.sum()), passed_second=int(selected.sum()))
        optimizer.zero_grad(set_to_none=True)
        if not selected.any():
            return step  # nothing selected: no update (as the official code)
        loss = (entropy[selected] * sample_weights(entropy[selected], self.e0)).mean()
        if self.fisher is not None:
            loss = loss + fisher_penalty(self.named_params, self.fisher, self.fisher_alpha)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step.loss = float(loss.detach())
        return step
