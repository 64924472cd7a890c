"""A model adapting online with SAR, Tent, EATA or ROID: its settings (:class:`TTAConfig`), the parameters it
updates, and :class:`Adapter`, which predicts each batch, then updates, and keeps a record of every step.
The methods are registered by name in :data:`TTA_METHODS`; each lives in its own module."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from adaptsoup.core.data import Preprocess
from adaptsoup.core.models import require_vit
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.eata import EATA, EATA_BASE_LR, fisher_information
from adaptsoup.tta.entropy import affine_parameters
from adaptsoup.tta.guard import DriftGuard, frozen_copy
from adaptsoup.tta.roid import ROID, ROID_BASE_LR, default_augment
from adaptsoup.tta.sar import SAR_BASE_LR, sar_modules, sar_step, update_ema
from adaptsoup.tta.tent import TENT_BASE_LR_ADAM, TENT_BASE_LR_SGD, tent_modules, tent_step

TTA_METHODS = ("sar", "tent", "eata", "roid")


@dataclass
class TTAConfig:
    method: str = "sar"
    batch_size: int = 64
    base_lr: float | None = None  # per 64 images; default: SAR 1e-3, Tent 2.5e-4, EATA 1e-3, ROID 2.5e-4 (references)
    momentum: float = 0.9
    rho: float = 0.05  # SAR: SAM neighbourhood
    e0_factor: float = 0.4  # SAR, EATA: E0 = e0_factor * ln(C)
    reset_threshold: float = 0.2  # SAR: model recovery when the loss EMA falls below this
    ema_momentum: float = 0.9
    episodic: bool = False  # reset to the initial model after every batch
    optimizer: str = "sgd"  # Tent, EATA, ROID: "sgd" (momentum; ROID's Nesterov) or "adam" (their CIFAR setting); SAR is SGD
    seed: int = 0  # order of the stream (and ROID's augmentations)
    shuffle: bool = True
    device: str = "cpu"
    d_margin: float = 0.05  # EATA: redundancy filter |cos(p, m)| < d_margin (official ImageNet; CIFAR-10 0.4)
    fisher_alpha: float = 2000.0  # EATA: weight of the Fisher anti-forgetting term (0: ETA)
    fisher_images: str | None = None  # EATA: folder of in-distribution images for the Fisher term (None: ETA)
    fisher_size: int = 2000  # EATA: at most this many of them (a seeded subset), as the official code
    roid_alpha: float = 0.99  # ROID: weight ensemble theta <- alpha theta + (1 - alpha) theta_soup after each step
    roid_temperature: float = 1 / 3  # ROID: weights exp(diversity x certainty / T)
    roid_consistency: bool = True  # ROID: the augmentation-consistency term (official default: on)
    roid_prior: str = "probabilities"  # ROID: prior correction of "probabilities", of "logits" (official code), "none"
    guard: bool = False  # reset when the stream drifts (adaptsoup.tta.guard)
    guard_window: int = 8  # batches in the guard's moving window
    # reset when the adapted model agrees with the unadapted one on fewer than this fraction of the window's images
    guard_min_agreement: float = 0.5
    # ... or when the entropy of its mean prediction falls below this fraction of the unadapted model's (class collapse)
    guard_min_marginal_ratio: float = 0.5

    def lr(self) -> float:
        """The learning rate at this batch size: ``base_lr`` (or the method's default) per 64 images, scaled linearly."""
        if self.base_lr is not None:
            base = self.base_lr
        elif self.method == "sar":
            base = SAR_BASE_LR
        elif self.method in ("eata", "roid") and self.optimizer == "sgd":
            base = EATA_BASE_LR if self.method == "eata" else ROID_BASE_LR
        else:  # Tent; Adam for EATA and ROID too (1e-3 at batch 200 in all three CIFAR configs)
            base = TENT_BASE_LR_ADAM if self.optimizer == "adam" else TENT_BASE_LR_SGD
        return base / 64 * self.batch_size


def norm_parameters(model: nn.Module, method: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters TTA updates: LayerNorm affine weights/biases (SAR: blocks below the top quarter; Tent,
    EATA, ROID: every LayerNorm)."""
    vit = require_vit(model, "test-time adaptation")
    if method in ("tent", "eata", "roid"):
        modules = tent_modules(vit)
    elif method == "sar":
        modules = sar_modules(vit)
    else:
        raise AdaptsoupError(f"unknown TTA method {method!r}; choose one of {', '.join(TTA_METHODS)}")
    params = affine_parameters(modules)
    if not params:
        raise AdaptsoupError(f"{method}: the model has no LayerNorm affine parameters to adapt")
    return params


@dataclass
class StepRecord:
    batch: int
    size: int
    passed_first: int
    passed_second: int
    loss: float | None
    ema: float | None
    reset: bool  # the method's own reset (SAR's model recovery)
    skipped: bool
    guard_reset: bool = False  # the drift guard reset the model after this batch (adaptsoup.tta.guard)
    guard_reason: str | None = None


def make_optimizer(params: list[nn.Parameter], cfg: TTAConfig) -> torch.optim.Optimizer:
    """SGD with momentum (SAR, EATA, Tent's ImageNet setting; Nesterov for ROID, as its official config) or Adam
    (the CIFAR setting of Tent, EATA and ROID)."""
    if cfg.optimizer not in ("sgd", "adam") or (cfg.optimizer == "adam" and cfg.method == "sar"):
        raise AdaptsoupError(f"optimizer must be sgd, or adam for tent, eata or roid; got {cfg.optimizer!r} for {cfg.method}")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr(), betas=(0.9, 0.999))
    if cfg.method == "roid":
        return torch.optim.SGD(params, lr=cfg.lr(), momentum=cfg.momentum, nesterov=True)
    return torch.optim.SGD(params, lr=cfg.lr(), momentum=cfg.momentum)


def method_state(cfg: TTAConfig, model: nn.Module, named_params: list[tuple[str, nn.Parameter]], e0: float,
                 fisher_batches: Iterable[torch.Tensor] | None) -> EATA | ROID | None:
    """What EATA or ROID keeps between batches (SAR and Tent keep theirs in the adapter); EATA's Fisher term is
    computed here, once, from ``fisher_batches`` (None: ETA)."""
    if cfg.method == "eata":
        fisher, count = None, 0
        if fisher_batches is not None and cfg.fisher_alpha > 0:
            fisher, count = fisher_information(model, named_params, (x.to(cfg.device) for x in fisher_batches))
        return EATA(named_params, e0, cfg.d_margin, fisher, cfg.fisher_alpha, fisher_images=count)
    if cfg.method == "roid":
        pre = Preprocess.for_model(model)
        view = default_augment(pre.mean, pre.std, cfg.seed) if cfg.roid_consistency else None
        return ROID([p for _, p in named_params], model.num_classes, cfg.batch_size, alpha=cfg.roid_alpha,
                    temperature=cfg.roid_temperature, prior=cfg.roid_prior, augment_view=view)
    return None


class Adapter:
    """A model adapting online: ``predict_and_adapt(x)`` returns the batch's logits, then updates.
    ``fisher_batches``: EATA's in-distribution inputs for its Fisher term (ignored by the other methods)."""

    def __init__(self, model: nn.Module, cfg: TTAConfig, fisher_batches: Iterable[torch.Tensor] | None = None) -> None:
        if cfg.method not in TTA_METHODS:
            raise AdaptsoupError(f"unknown TTA method {cfg.method!r}; choose one of {', '.join(TTA_METHODS)}")
        self.model = model.to(cfg.device).eval()
        self.cfg = cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.named_params = norm_parameters(self.model, cfg.method)
        self.params = [p for _, p in self.named_params]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(self.params, cfg)
        # the drift guard's reference: the unadapted model, frozen, run on every batch too (cfg.guard)
        self.guard = DriftGuard(cfg.guard_window, cfg.guard_min_agreement, cfg.guard_min_marginal_ratio) if cfg.guard else None
        self.anchor = frozen_copy(self.model) if cfg.guard else None
        self.e0 = cfg.e0_factor * math.log(model.num_classes)
        self.ema: float | None = None
        self.records: list[StepRecord] = []
        self.state = method_state(cfg, self.model, self.named_params, self.e0, fisher_batches)
        self._initial_model = copy.deepcopy(self.model.state_dict())
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Back to the initial model and optimizer state; the loss EMA (EATA's, ROID's moving average) and the
        drift guard's window restart."""
        self.model.load_state_dict(self._initial_model)
        self.optimizer.load_state_dict(self._initial_optimizer)
        self.ema = None
        if self.state is not None:
            self.state.reset()
        if self.guard is not None:
            self.guard.restart()

    @torch.enable_grad()  # adapting needs gradients even when the caller runs under no_grad
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.cfg.device)
        if self.cfg.episodic:
            self.reset()
        if self.cfg.method == "sar":
            logits = self._sar_step(x)
        elif self.cfg.method == "tent":
            logits = self._tent_step(x)
        else:
            logits = self._state_step(x)
        if self.guard is not None:
            self._check_drift(x, logits.detach())
        return logits.detach().cpu()

    @torch.no_grad()
    def _check_drift(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Show the guard this batch's predictions beside the unadapted model's; reset when it says so, and
        record why.  A batch after which the method reset on its own is not shown (the window restarted)."""
        record = self.records[-1]
        if record.reset:
            return
        reason = self.guard.observe(logits, self.anchor(x))
        if reason is not None:
            self.reset()
            record.guard_reset, record.guard_reason = True, reason

    def _state_step(self, x: torch.Tensor) -> torch.Tensor:
        """EATA (passed_first: reliable, passed_second: also non-redundant) or ROID (passed_second: kept)."""
        step = self.state.step(self.model, self.optimizer, x)
        first, second = (step.passed_first, step.passed_second) if self.cfg.method == "eata" else (len(x), step.kept)
        self.records.append(StepRecord(len(self.records), len(x), first, second, step.loss, None, False, step.loss is None))
        return step.logits

    def _tent_step(self, x: torch.Tensor) -> torch.Tensor:
        logits, loss = tent_step(self.model, self.optimizer, x)
        self.records.append(StepRecord(len(self.records), len(x), len(x), len(x), loss, None, False, False))
        return logits

    def _sar_step(self, x: torch.Tensor) -> torch.Tensor:
        step = sar_step(self.model, self.optimizer, self.params, x, self.e0, self.cfg.rho)
        record = StepRecord(len(self.records), len(x), step.passed_first, step.passed_second, step.loss, self.ema,
                            reset=False, skipped=step.loss is None)
        self.records.append(record)
        if step.loss is None:
            return step.logits
        if math.isfinite(step.loss):
            self.ema = update_ema(self.ema, step.loss, self.cfg.ema_momentum)
        record.ema = self.ema
        if self.ema is not None and self.ema < self.cfg.reset_threshold:  # SAR's model recovery
            self.reset()
            record.reset = True
        return step.logits
