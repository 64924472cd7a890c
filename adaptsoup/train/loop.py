"""Training: one resumable loop (AdamW, warm-up + cosine) used by inter-training and fine-tuning.

A run is a pure function of its config and data: batch order comes from :func:`adaptsoup.core.data.epoch_order`,
and the Python/PyTorch RNG states (augmentation, masking) are saved with the model and optimizer in the
resume file, so a run that is cut off and resumed ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess, augment_batch, batch_indices, make_train_transform
from adaptsoup.core.io import atomic_path
from adaptsoup.core.progress import NullProgress
from adaptsoup.train.losses import LossFn
from adaptsoup.train.optim import make_optimizer, make_scheduler


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

    def record(self, cfg: TrainConfig) -> dict:
        """The manifest's record of this run: its config, time, throughput and losses."""
        return {"config": cfg.to_dict(), "wall_s": round(self.wall_s, 2), "images_per_s": round(self.images_per_s, 1),
                "final_loss": self.losses[-1] if self.losses else None, "losses": [round(x, 5) for x in self.losses],
                "resumed_from_step": self.resumed_from}


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
    optimizer = make_optimizer(module, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_ratio)
    transform = make_train_transform(preprocess, cfg.augment, cfg.crop_scale)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start_step, losses, wall_before = 0, [], 0.0
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.is_file():
        start_step, losses, wall_before = load_train_state(state_path, module, optimizer)
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
        x, y = _batch(data, idx, preprocess, transform, cfg.views, device)
        try:
            loss = _optimizer_step(module, loss_fn, x, y, optimizer, cfg, device)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{description}: {exc} (step {step})") from None
        seen += len(idx)
        window.append(loss)
        if on_step is not None:
            on_step(step, loss)
        if len(window) >= log_every or step == cfg.steps - 1:
            losses.append(sum(window) / len(window))
            window = []
        elapsed = time.perf_counter() - t0
        progress.update(task, advance=1, info=f"loss {losses[-1] if losses else loss:.4f}  {seen / max(elapsed, 1e-9):.0f} img/s")
        if state_path is not None and time.monotonic() - last_save > cfg.checkpoint_every_s and step + 1 < cfg.steps:
            save_train_state(state_path, step + 1, module, optimizer, losses, wall_before + time.perf_counter() - t0)
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


def _batch(data: ImageSet, idx: torch.Tensor, preprocess: Preprocess, transform, views: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The augmented images of ``idx`` (``[views, B, C, H, W]`` when ``views > 1``) and their labels, on ``device``."""
    if views > 1:
        x = torch.stack([augment_batch(data.images[idx], preprocess, transform) for _ in range(views)]).to(device)
    else:
        x = augment_batch(data.images[idx], preprocess, transform).to(device, non_blocking=True)
    y = data.labels[idx].to(device) if data.labels is not None else None
    return x, y


def _optimizer_step(module: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor | None, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, device: torch.device) -> float:
    """One step: loss (under bf16 autocast if asked), backward, gradient clipping, update; returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss = loss_fn(module, x, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.item())


# --------------------------------------------------------------------------------------------------------------
# The resume file: model, optimizer, RNG states, losses so far


def save_train_state(path: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, losses: list[float],
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


def load_train_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[float], float]:
    """Restore ``module``, ``optimizer`` and the RNG states; returns (next step, losses so far, wall time so far)."""
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
