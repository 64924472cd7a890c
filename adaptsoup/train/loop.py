"""Training: one resumable loop (AdamW, warm-up + cosine) used by MAE inter-training and fine-tuning.

A run is a pure function of its config and data: batch order comes from :func:`adaptsoup.core.data.epoch_order`,
and the Python/PyTorch RNG states (augmentation, masking) are saved with the model and optimizer in the
resume file, so a run that is cut off and resumed ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess, augment_batch, batch_indices, make_train_transform
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.io import atomic_path
from adaptsoup.core.progress import NullProgress


@dataclass
class TrainConfig:
    """Optimisation of one training run (the paper's: AdamW, wd 0.01, 10% warm-up, cosine, batch 128)."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 128
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    augment: str = "3a"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    seed: int = 0
    bf16: bool = False
    device: str = "cpu"
    checkpoint_every_s: float = 120.0
    views: int = 1  # > 1: each batch is augmented this many times, stacked as [views, B, C, H, W]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per logged window
    wall_s: float = 0.0
    images_per_s: float = 0.0
    resumed_from: int = 0


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms, tokens and position embeddings."""
    no_decay = set()
    if hasattr(module, "no_weight_decay"):
        no_decay = set(module.no_weight_decay())
    groups = param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=no_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> CosineLRScheduler:
    """timm's cosine schedule in optimizer steps, with linear warm-up over ``warmup_frac`` of them."""
    warmup = int(round(cfg.warmup_frac * cfg.steps))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, cfg.steps - warmup),
        lr_min=cfg.lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=cfg.lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def train(
    module: nn.Module,
    loss_fn: LossFn,
    data: ImageSet,
    preprocess: Preprocess,
    cfg: TrainConfig,
    *,
    state_path: str | os.PathLike | None = None,
    progress=None,
    description: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps of ``loss_fn`` on augmented batches of ``data``.

    If ``state_path`` exists the run resumes from it; the state is written there (atomically) every
    ``cfg.checkpoint_every_s`` seconds and removed when the run completes.
    """
    progress = progress or NullProgress()
    device = torch.device(cfg.device)
    module.to(device)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    transform = make_train_transform(preprocess, cfg.augment, cfg.crop_scale)
    labels = data.labels

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start_step, losses, wall_before = 0, [], 0.0
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.is_file():
        start_step, losses, wall_before = _load_state(state_path, module, optimizer)
    result = TrainResult(steps=cfg.steps, losses=losses, resumed_from=start_step)
    if start_step >= cfg.steps:
        return result

    task = progress.add_task(description, total=cfg.steps, completed=start_step)
    module.train()
    last_save = time.monotonic()
    t0 = time.perf_counter()
    window: list[float] = []
    log_every = max(1, min(50, cfg.steps // 20))
    batches = batch_indices(len(data), cfg.batch_size, cfg.seed, start_step)
    seen = 0
    for step in range(start_step, cfg.steps):
        idx = next(batches)
        scheduler.step_update(step)
        if cfg.views > 1:
            x = torch.stack([augment_batch(data.images[idx], preprocess, transform) for _ in range(cfg.views)]).to(device)
        else:
            x = augment_batch(data.images[idx], preprocess, transform).to(device, non_blocking=True)
        y = labels[idx].to(device) if labels is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(module, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        seen += len(idx)
        window.append(float(loss.item()))
        if on_step is not None:
            on_step(step, window[-1])
        if len(window) >= log_every or step == cfg.steps - 1:
            losses.append(sum(window) / len(window))
            window = []
        elapsed = time.perf_counter() - t0
        progress.update(task, advance=1, info=f"loss {losses[-1] if losses else loss.item():.4f}  {seen / max(elapsed, 1e-9):.0f} img/s")
        if state_path is not None and time.monotonic() - last_save > cfg.checkpoint_every_s and step + 1 < cfg.steps:
            _save_state(state_path, step + 1, module, optimizer, losses, wall_before + time.perf_counter() - t0)
            last_save = time.monotonic()
    elapsed = time.perf_counter() - t0
    result.images_per_s = seen / max(elapsed, 1e-9)
    result.wall_s = wall_before + elapsed  # over all sittings of a resumed run
    result.losses = losses
    progress.remove_task(task)
    module.eval()
    if state_path is not None and state_path.exists():
        state_path.unlink()
    return result


def _save_state(path: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, losses: list[float],
                wall_s: float) -> None:
    state = {
        "wall_s": wall_s,
        "step": step,
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": _python_rng_state(),
        "losses": list(losses),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[float], float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return int(state["step"]), list(state["losses"]), float(state.get("wall_s", 0.0))


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# --------------------------------------------------------------------------------------------------------------
# Losses


def classification_loss(label_smoothing: float = 0.1) -> LossFn:
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("fine-tuning needs labels")
        return criterion(model(x).float(), y)

    return loss_fn


def mae_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    loss, _, _ = module(x)
    return loss


# --------------------------------------------------------------------------------------------------------------
# Linear probe (the LP of LP-FT)


@dataclass
class LinearProbeConfig:
    weight_decay: float = 1e-4
    max_iter: int = 200
    batch_size: int = 256
    device: str = "cpu"
    bf16: bool = False


def fit_linear_probe(model: nn.Module, data: ImageSet, preprocess: Preprocess, cfg: LinearProbeConfig) -> dict[str, float]:
    """Set ``model``'s head to the L2-regularised logistic-regression solution on frozen features.

    Features are extracted once (no augmentation); the head is fit by full-batch L-BFGS, which converges to
    the linear-probe optimum in seconds.  Returns the probe's training loss and accuracy.
    """
    if data.labels is None:
        raise ValueError("the linear probe needs labels")
    feats = run_model(model, data, preprocess, want_logits=False, want_features=True, batch_size=cfg.batch_size, device=cfg.device, bf16=cfg.bf16).features
    feats = feats.double()
    labels = data.labels
    head = model.get_classifier()
    num_classes = head.out_features
    w = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(feats @ w.T + b, labels) + cfg.weight_decay * 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
        head.bias.copy_(b.to(head.bias.dtype))
        logits = feats @ w.T + b
        loss = float(nn.functional.cross_entropy(logits, labels))
        acc = float((logits.argmax(1) == labels).double().mean() * 100)
    return {"train_loss": loss, "train_acc": acc, "feature_dim": int(feats.shape[1])}


def steps_for_epochs(epochs: float, num_images: int, batch_size: int) -> int:
    return max(1, int(math.ceil(epochs * num_images / max(1, min(batch_size, num_images)))))
