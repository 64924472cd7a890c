"""A model adapting online with SAR or Tent: its settings (:class:`TTAConfig`), the parameters it updates,
and :class:`Adapter`, which predicts each batch, then updates, and keeps a record of every step."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptsoup.core.models import require_vit
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.entropy import affine_parameters
from adaptsoup.tta.sar import SAR_BASE_LR, sar_modules, sar_step, update_ema
from adaptsoup.tta.tent import TENT_BASE_LR_ADAM, TENT_BASE_LR_SGD, tent_modules, tent_step

TTA_METHODS = ("sar", "tent")


@dataclass
class TTAConfig:
    method: str = "sar"
    batch_size: int = 64
    base_lr: float | None = None  # per 64 images; default: SAR 1e-3, Tent 2.5e-4 (their references)
    momentum: float = 0.9
    rho: float = 0.05  # SAR: SAM neighbourhood
    e0_factor: float = 0.4  # SAR: E0 = e0_factor * ln(C)
    reset_threshold: float = 0.2  # SAR: model recovery when the loss EMA falls below this
    ema_momentum: float = 0.9
    episodic: bool = False  # reset to the initial model after every batch
    optimizer: str = "sgd"  # Tent only: "sgd" (momentum, its ImageNet setting) or "adam" (its CIFAR setting); SAR is SGD
    seed: int = 0  # order of the stream
    shuffle: bool = True
    device: str = "cpu"

    def lr(self) -> float:
        """The learning rate at this batch size: ``base_lr`` (or the method's default) per 64 images, scaled linearly."""
        if self.base_lr is not None:
            base = self.base_lr
        elif self.method == "sar":
            base = SAR_BASE_LR
        else:
            base = TENT_BASE_LR_ADAM if self.optimizer == "adam" else TENT_BASE_LR_SGD
        return base / 64 * self.batch_size


def norm_parameters(model: nn.Module, method: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters TTA updates: LayerNorm affine weights/biases (SAR: blocks below the top quarter)."""
    vit = require_vit(model, "test-time adaptation")
    if method == "tent":
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
    reset: bool
    skipped: bool


def make_optimizer(params: list[nn.Parameter], cfg: TTAConfig) -> torch.optim.Optimizer:
    """SGD with momentum (SAR, Tent's ImageNet setting) or Adam (Tent's CIFAR setting)."""
    if cfg.optimizer not in ("sgd", "adam") or (cfg.optimizer == "adam" and cfg.method != "tent"):
        raise AdaptsoupError(f"optimizer must be sgd, or adam for tent; got {cfg.optimizer!r} for {cfg.method}")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr(), betas=(0.9, 0.999))
    return torch.optim.SGD(params, lr=cfg.lr(), momentum=cfg.momentum)


class Adapter:
    """A model adapting online: ``predict_and_adapt(x)`` returns the batch's logits, then updates."""

    def __init__(self, model: nn.Module, cfg: TTAConfig) -> None:
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
        self.e0 = cfg.e0_factor * math.log(model.num_classes)
        self.ema: float | None = None
        self.records: list[StepRecord] = []
        self._initial_model = copy.deepcopy(self.model.state_dict())
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Back to the initial model and optimizer state; the loss EMA restarts."""
        self.model.load_state_dict(self._initial_model)
        self.optimizer.load_state_dict(self._initial_optimizer)
        self.ema = None

    @torch.enable_grad()  # adapting needs gradients even when the caller runs under no_grad
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.cfg.device)
        if self.cfg.episodic:
            self.reset()
        logits = self._sar_step(x) if self.cfg.method == "sar" else self._tent_step(x)
        return logits.detach().cpu()

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
