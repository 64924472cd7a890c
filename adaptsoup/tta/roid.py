"""ROID (Marsden, Döbler and Yang, WACV 2024, "Universal test-time adaptation through weight ensembling,
diversity weighting, and prior correction"), as in its official code: ``ROID.loss_calculation`` and
``ROID.forward_and_adapt`` of mariodoebler/test-time-adaptation ``classification/methods/roid.py``, with the
defaults of its ``conf.py`` (``_C.ROID``) and ``cfgs/*/roid.yaml``:

* loss: the soft likelihood ratio −Σ p·log(p / (1 − p) + 1e-5) (p clipped at 0.99), per sample, weighted by
  exp(diversity·certainty / T) with T = 1/3: diversity = 1 − cos(softmax, m), certainty = −entropy, each
  min-max normalised over the batch, ``m`` a moving average of the batch-mean softmax (0.9, starting uniform);
  samples with diversity below the batch mean get weight 0; the weighted sum is divided by the batch size;
* consistency (on by default, as the official config): + the weighted symmetric cross-entropy between the
  kept samples and an augmented view of them (colour jitter, reflect-pad, random affine, centre crop,
  horizontal flip: one random draw per batch, seeded by ``seed``);
* weight ensembling after every update: θ ← α·θ + (1 − α)·θ_source, α = 0.99, on the adapted parameters;
* prior correction of the outputs: the batch's mean softmax, smoothed by
  s = max(1/B, 1/C) / max(prior) into (prior + s) / (1 + s·C), reweights the predictions;
* parameters: the affine weight and bias of every LayerNorm, SGD with Nesterov momentum 0.9 at base_lr 2.5e-4
  per 64 images (the official ImageNet configs), or Adam (1e-3 at batch 200, its CIFAR configs); eval mode.

**The soup is ROID's source model.**  The weight ensemble pulls the adapted parameters back towards the soup
after every step: θ − θ_soup is the sum of the stream's updates, each shrunk by α at its own step and at every
step after it (α = 0.99: an update 100 steps old counts about a third), an interpolation from the soup towards
the stream that keeps the model near the soup.  With α = 1 the model drifts freely (plain self-training on the
stream); with α = 0 every step is undone (the soup, plus prior correction).  The ingredients never enter: only
the soup's LayerNorm parameters anchor the ensemble.

One deviation: the official code multiplies the *logits* by the smoothed prior, which for a negative logit
lowers the score of the classes the batch favours.  Here the *probabilities* are multiplied and renormalised
(the usual label-shift correction, Saerens et al. 2002), and the returned outputs are their logarithm, so that
softmax gives the corrected probabilities.  ``roid_prior = "logits"`` reproduces the official outputs, and
``"none"`` turns the correction off.  The updates do not depend on it (the correction comes after them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.entropy import softmax_entropy

ROID_BASE_LR = 2.5e-4  # per 64 images, SGD with Nesterov momentum: the official ImageNet configs
ROID_ALPHA = 0.99  # _C.ROID.MOMENTUM_SRC
PROBS_MOMENTUM = 0.9  # _C.ROID.MOMENTUM_PROBS
TEMPERATURE = 1 / 3  # _C.ROID.TEMPERATURE
PRIOR_MODES = ("probabilities", "logits", "none")


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample −Σ_c p_c·log(p_c / (1 − p_c) + eps), with p = softmax clipped to [0, clip]."""
    p = logits.softmax(dim=1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(dim=1)


def symmetric_cross_entropy(x: torch.Tensor, x_ref: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample ½·CE(softmax(x_ref), x) + ½·CE(softmax(x), x_ref), both directions differentiable."""
    return (-(1 - alpha) * (x_ref.softmax(dim=1) * x.log_softmax(dim=1)).sum(dim=1)
            - alpha * (x.softmax(dim=1) * x_ref.log_softmax(dim=1)).sum(dim=1))


def min_max(v: torch.Tensor) -> torch.Tensor:
    """(v − min) / (max − min) over the batch; all zeros when every value is the same (a batch of one)."""
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


@torch.no_grad()
def sample_weights(logits: torch.Tensor, probs_ema: torch.Tensor,
                   temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Certainty and diversity weights and the samples they keep: ``(weights, keep)``; dropped samples weigh 0."""
    diversity = min_max(1 - F.cosine_similarity(probs_ema.unsqueeze(0), logits.softmax(dim=1), dim=1))
    certainty = min_max(-softmax_entropy(logits))
    keep = ~(diversity < diversity.mean())
    weights = torch.exp(diversity * certainty / temperature)
    weights[~keep] = 0.0
    return weights, keep


@torch.no_grad()
def ensemble_with_source(params: list[nn.Parameter], source: list[torch.Tensor], alpha: float) -> None:
    """θ ← α·θ + (1 − α)·θ_source for each adapted parameter (α = 1: unchanged; α = 0: the source)."""
    if alpha >= 1.0:
        return  # as the official code: no ensembling at all
    for p, s in zip(params, source):
        p.copy_(alpha * p + (1 - alpha) * s)


def smoothed_prior(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean softmax, smoothed: (prior + s) / (1 + s·C) with s = max(1/B, 1/C) / max(prior)."""
    batch, classes = logits.shape
    prior = logits.softmax(dim=1).mean(dim=0)
    smooth = max(1 / batch, 1 / classes) / prior.max()
    return (prior + smooth) / (1 + smooth * classes)


@torch.no_grad()
def prior_correction(logits: torch.Tensor, mode: str = "probabilities") -> torch.Tensor:
    """The outputs reweighted by the smoothed prior π: ``probabilities``: log(p·π / Σ p·π); ``logits``: z·π
    (the official code's); ``none``: the logits as they are."""
    if mode == "none":
        return logits
    prior = smoothed_prior(logits)
    if mode == "logits":
        return logits * prior
    return (logits.log_softmax(dim=1) + prior.log()).log_softmax(dim=1)


@torch.no_grad()
def augment(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """ROID's augmented view of a normalised batch (the official ``get_tta_transforms(cotta_augs=False)``), in
    pixel space [0, 1]: brightness, contrast, saturation, hue and gamma in random order, reflect-pad by half the
    size, a random affine (±15°, shift ±1/16, scale 0.9–1.1, bilinear), centre crop, flip with probability ½."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def uniform(lo: float, hi: float) -> float:
        return float(torch.empty(()).uniform_(lo, hi, generator=generator))

    img = (x * s + m).clamp(0.0, 1.0)
    jitters = [lambda t: TF.adjust_brightness(t, uniform(0.6, 1.4)), lambda t: TF.adjust_contrast(t, uniform(0.7, 1.3)),
               lambda t: TF.adjust_saturation(t, uniform(0.5, 1.5)), lambda t: TF.adjust_hue(t, uniform(-0.06, 0.06)),
               lambda t: TF.adjust_gamma(t.clamp(1e-8, 1.0), uniform(0.7, 1.3))]
    for k in torch.randperm(len(jitters), generator=generator).tolist():
        img = jitters[k](img)
    height, width = img.shape[-2:]
    img = TF.pad(img, [height // 2] * 4, padding_mode="reflect")
    angle = uniform(-15.0, 15.0)
    shift = [round(uniform(-img.shape[-1] / 16, img.shape[-1] / 16)), round(uniform(-img.shape[-2] / 16, img.shape[-2] / 16))]
    img = TF.affine(img, angle=angle, translate=shift, scale=uniform(0.9, 1.1), shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=0.0)
    img = TF.center_crop(img, [height, width])
    if uniform(0.0, 1.0) < 0.5:
        img = TF.hflip(img)
    return (img.clamp(0.0, 1.0) - m) / s


@dataclass
class ROIDStep:
    """What one ROID step did: the corrected outputs, the samples kept by the weighting, the loss."""

    logits: torch.Tensor
    kept: int
    loss: float


class ROID:
    """ROID's state between batches: the source (soup) parameters, the moving average ``m``, the augmentation."""

    def __init__(self, params: list[nn.Parameter], num_classes: int, batch_size: int, *, alpha: float = ROID_ALPHA,
                 temperature: float = TEMPERATURE, prior: str = "probabilities",
                 augment_view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if prior not in PRIOR_MODES:
            raise AdaptsoupError(f"roid_prior must be one of {', '.join(PRIOR_MODES)}, got {prior!r}")
        if not 0.0 <= alpha <= 1.0:
            raise AdaptsoupError(f"roid_alpha must be in [0, 1], got {alpha}")
        self.params = params
        self.source = [p.detach().clone() for p in params]  # the soup: what the ensemble pulls back to
        self.num_classes = num_classes
        self.batch_size = batch_size  # the loss is divided by the configured batch size, as the official code
        self.alpha, self.temperature, self.prior = alpha, temperature, prior
        self.augment = augment_view  # the consistency term's augmentation; None: no consistency term
        self.probs_ema = self.uniform()

    def uniform(self) -> torch.Tensor:
        return torch.full((self.num_classes,), 1.0 / self.num_classes, device=self.params[0].device)

    def reset(self) -> None:
        """The moving average back to uniform (the model and optimizer are the adapter's to reset)."""
        self.probs_ema = self.uniform()

    def describe(self) -> dict:
        return {"roid_alpha": self.alpha, "roid_temperature": self.temperature,
                "roid_consistency": self.augment is not None, "roid_prior": self.prior}

    def loss(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The weighted soft-likelihood-ratio loss (+ consistency); updates ``m``.  ``(logits, loss, kept)``."""
        logits = model(x)
        weights, keep = sample_weights(logits, self.probs_ema, self.temperature)
        self.probs_ema = PROBS_MOMENTUM * self.probs_ema + (1 - PROBS_MOMENTUM) * logits.detach().softmax(dim=1).mean(dim=0)
        loss = (soft_likelihood_ratio(logits) * weights)[keep].sum() / self.batch_size
        if self.augment is not None and keep.any():
            logits_aug = model(self.augment(x[keep]))
            loss = loss + (symmetric_cross_entropy(logits_aug, logits[keep]) * weights[keep]).sum() / self.batch_size
        return logits, loss, int(keep.sum())

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> ROIDStep:
        """Loss, update, ensemble with the source, then the prior-corrected outputs of the (pre-update) forward."""
        optimizer.zero_grad(set_to_none=True)
        logits, loss, kept = self.loss(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ensemble_with_source(self.params, self.source, self.alpha)
        return ROIDStep(logits=prior_correction(logits.detach(), self.prior), kept=kept, loss=float(loss.detach()))


def default_augment(mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The consistency term's augmentation for a model normalised with ``mean``/``std``, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: augment(x, mean, std, generator)

