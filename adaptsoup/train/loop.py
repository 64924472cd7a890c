"""Training: one resumable loop (AdamW, warm-up + cosine) used by inter-training and fine-tuning.

A run is a pure function of its config and data: batch order comes from :func:`adaptsoup.core.data.epoch_order`,
and the RNG states are saved with the model and optimizer in the resume file (Python's and the CPU
generator, which augmentation draws from, and the default generator of the run's accelerator, where MAE
draws its masks when it trains on one), so a run that is cut off and resumed ends exactly where an
uninterrupted one would.

Under ``torchrun`` (:mod:`adaptsoup.core.distributed`) the module is wrapped in DistributedDataParallel.
Every rank draws the same global batch with the same RNG streams as a one-process run (augmenting it whole,
so the random state stays identical on every rank) and trains on its own slice; the slice's loss is scaled
so that the averaged gradients are the global batch's mean.  The trajectory is the one-process run's up to
float reduction order, the resume file is the same whatever the world size, and rank 0 alone writes it.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, MutableMapping

import torch
from torch import nn

from adaptsoup.core import distributed
from adaptsoup.core.data import ImageSet, Preprocess, augment_batch, batch_indices, make_train_transform
from adaptsoup.core.io import atomic_path
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup.train.losses import LossFn
from adaptsoup.train.optim import make_optimizer, make_scheduler
from adaptsoup.train.precision import FP32, Precision, PrecisionChoice, resolve_precision, train_step_probe


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
    precision: str = "fp32"  # auto (the fastest, probed on this machine), fp32 or bf16 (autocast): adaptsoup.train.precision
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
    precision: dict = field(default_factory=dict)  # PrecisionChoice.record(): what ran, what was asked, the probe

    def record(self, cfg: TrainConfig) -> dict:
        """The manifest's record of this run: its config, time, throughput and losses."""
        return {"config": cfg.to_dict(), "wall_s": round(self.wall_s, 2), "images_per_s": round(self.images_per_s, 1),
                "final_loss": self.losses[-1] if self.losses else None, "losses": [round(x, 5) for x in self.losses],
                "resumed_from_step": self.resumed_from, "precision": self.precision}


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
    precision_memo: MutableMapping[str, str] | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps of ``loss_fn`` on augmented batches of ``data``.

    If ``state_path`` exists the run resumes from it; the state is written there (atomically) every
    ``cfg.checkpoint_every_s`` seconds and removed when the run completes.  ``precision_memo`` keeps the
    precision ``auto`` chose for each kind of run (a run's manifest keeps it, so that every run of a grid
    and every later resume of it use the choice of the first probe).
    """
    progress = progress or NullProgress()
    world = distributed.world()
    device = torch.device(distributed.device_for(cfg.device))
    module.to(device)
    optimizer = make_optimizer(module, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_ratio)
    transform = make_train_transform(preprocess, cfg.augment, cfg.crop_scale)

    torch.manual_seed(cfg.seed), random.seed(cfg.seed)
    start_step, losses, wall_before, resumed_precision = 0, [], 0.0, None
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.is_file():
        start_step, losses, wall_before, resumed_precision = load_train_state(state_path, module, optimizer, device)
    result = TrainResult(steps=cfg.steps, losses=losses, resumed_from=start_step)
    if start_step >= cfg.steps:
        return result
    choice = _choose_precision(module, loss_fn, data, preprocess, transform, cfg, device, world, resumed_precision,
                               {} if precision_memo is None else precision_memo)
    result.precision = choice.record()

    net = _data_parallel(module, cfg, world, device)
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
        x, y, share = _rank_batch(data, idx, preprocess, transform, cfg.views, device, world)
        _set_batch_share(module, share if world.distributed else None)
        try:
            loss = _optimizer_step(net, loss_fn, x, y, optimizer, cfg, device, share, choice.precision)
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
        if (world.is_main and state_path is not None and time.monotonic() - last_save > cfg.checkpoint_every_s
                and step + 1 < cfg.steps):
            save_train_state(state_path, step + 1, module, optimizer, losses, wall_before + time.perf_counter() - t0,
                             choice.precision.label, device)
            last_save = time.monotonic()
    _set_batch_share(module, None)
    elapsed = time.perf_counter() - t0
    result.images_per_s, result.wall_s, result.losses = seen / max(elapsed, 1e-9), wall_before + elapsed, losses  # wall: all sittings
    progress.remove_task(task)
    module.eval()
    if world.is_main and state_path is not None and state_path.exists():
        state_path.unlink()
    return result


_PROBED: dict[str, PrecisionChoice] = {}  # one probe per kind of run and process (a grid trains many alike)


def _choose_precision(module: nn.Module, loss_fn: LossFn, data: ImageSet, preprocess: Preprocess, transform, cfg: TrainConfig,
                      device: torch.device, world: distributed.World, resumed: str | None, memo: MutableMapping[str, str]) -> PrecisionChoice:
    """The run's precision: the one it started with when resuming; for ``auto`` the one recorded in ``memo``
    for this kind of run, else a probe of this run's own step on its first batch (model, gradients and RNG
    left as found; once per process and kind); else :func:`resolve_precision`."""
    if resumed is not None:
        return PrecisionChoice(Precision.from_label(resumed), cfg.precision, "kept from the run being resumed")
    if cfg.precision != "auto" or device.type != "cpu":
        return resolve_precision(cfg.precision, device.type, None)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    key = (f"{type(module).__name__}/{sum(p.numel() for p in module.parameters())} params, {trainable} trained/batch {cfg.batch_size}"
           f"/views {cfg.views}/{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}")
    if key in memo:
        return PrecisionChoice(Precision.from_label(memo[key]), cfg.precision, "as the first probe of this run chose")
    if world.distributed:
        return PrecisionChoice(FP32, cfg.precision, "not probed under torchrun (every rank must use the same precision)")
    if key not in _PROBED:
        _PROBED[key] = _probe(module, loss_fn, data, preprocess, transform, cfg, device)
    memo[key] = _PROBED[key].precision.label
    return _PROBED[key]


def _probe(module: nn.Module, loss_fn: LossFn, data: ImageSet, preprocess: Preprocess, transform, cfg: TrainConfig,
           device: torch.device) -> PrecisionChoice:
    rng_torch, rng_python = torch.get_rng_state(), random.getstate()
    x, y = _batch(data, next(batch_indices(len(data), cfg.batch_size, cfg.seed, 0)), preprocess, transform, cfg.views, device)
    module.train()
    try:
        return resolve_precision("auto", device.type, train_step_probe(module, loss_fn, x, y, device.type))
    finally:
        module.zero_grad(set_to_none=True)
        torch.set_rng_state(rng_torch)
        random.setstate(rng_python)


def _data_parallel(module: nn.Module, cfg: TrainConfig, world: distributed.World, device: torch.device) -> nn.Module:
    """``module`` itself in a one-process world; else wrapped in DistributedDataParallel."""
    if not world.distributed:
        return module
    if cfg.views > 1:
        raise AdaptsoupError("multi-view losses (MoCo v3, MMCR) contrast across the whole batch and are not data-parallel yet: "
                             "run them without torchrun, or use mae")
    from torch.nn.parallel import DistributedDataParallel

    # A wrapper around the encoder (MAE) leaves the classifier head unused: it keeps no gradient, as in one process.
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=hasattr(module, "encoder"))


def _rank_batch(data: ImageSet, idx: torch.Tensor, preprocess: Preprocess, transform, views: int, device: torch.device,
                world: distributed.World) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, int]]:
    """This rank's slice of the global batch ``idx`` and ``(start, stop, global size)``.  With a random
    transform the whole batch is augmented on every rank, so every rank's RNG stays where one process's is."""
    total = len(idx)
    part = distributed.rank_slice(total, world) if world.distributed else slice(0, total)
    if transform is None:
        x, y = _batch(data, idx[part], preprocess, transform, views, device)
    else:
        x, y = _batch(data, idx, preprocess, transform, views, device)
        if world.distributed:
            x = x[:, part] if views > 1 else x[part]
            y = y[part] if y is not None else None
    return x, y, (part.start, part.stop, total)


def _set_batch_share(module: nn.Module, share: tuple[int, int, int] | None) -> None:
    """Tell a module that draws per-sample randomness (MAE's masks) which part of the global batch it sees."""
    if hasattr(module, "batch_share"):
        module.batch_share = share


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
                    cfg: TrainConfig, device: torch.device, share: tuple[int, int, int], precision: Precision) -> float:
    """One step: loss (in ``precision``: bf16 autocast, attention kernel), backward, gradient clipping, update;
    returns the global batch's loss.  A rank's loss is weighted by its share of the batch, so the gradients
    that DistributedDataParallel averages are the global batch's."""
    with precision.context(device.type):
        loss = loss_fn(module, x, y)
    start, stop, total = share
    world_size = distributed.world().size
    weight = (stop - start) / total
    reported = _global_loss(loss.detach().float() * weight, world_size)
    if not torch.isfinite(reported):
        raise FloatingPointError(f"loss became {reported.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    (loss * (weight * world_size) if world_size > 1 else loss).backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(reported.item())


def _global_loss(weighted: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum over ranks of their weighted losses: the global batch's mean loss (same on every rank)."""
    if world_size > 1:
        import torch.distributed as dist

        weighted = weighted.clone()
        dist.all_reduce(weighted)
    return weighted


# --------------------------------------------------------------------------------------------------------------
# The resume file: model, optimizer, RNG states, losses so far


def save_train_state(path: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, losses: list[float],
                     wall_s: float, precision: str = "fp32", device: torch.device | None = None) -> None:
    """Write the resume file: model, optimizer, losses and every generator the run draws from (the accelerator
    ``device``'s too, if the run trains on one)."""
    state = {
        "precision": precision,
        "wall_s": wall_s,
        "step": step,
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": _python_rng_state(),
        "losses": list(losses),
    }
    rng = _device_rng(device) if device is not None else None
    if rng is not None:
        state["rng_device"] = {"type": device.type, "state": rng[0]()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device | None = None) -> tuple[int, list[float], float, str | None]:
    """Restore ``module``, ``optimizer`` and the RNG states; returns (next step, losses so far, wall time so far,
    the precision label the run started with — None in a file from before precisions were recorded).

    The saved accelerator generator is restored onto ``device``, whatever its index: under torchrun every
    rank's generator is where rank 0's is (all draw the global batch's masks), and a run may resume on
    another GPU or world size.  A file written on another kind of device (or on the CPU) restores none: that
    resume starts the accelerator's generator from the seed, as an older file does."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    saved, rng = state.get("rng_device"), _device_rng(device) if device is not None else None
    if saved is not None and rng is not None and saved["type"] == device.type:
        rng[1](saved["state"])
    return int(state["step"]), list(state["losses"]), float(state.get("wall_s", 0.0)), state.get("precision")


def _device_rng(device: torch.device) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]] | None:
    """(get, set) of the state of the default generator of accelerator ``device``, the one MAE's masks and
    dropout draw from on it; None for the CPU, whose generator is saved as ``rng_torch``."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index)), (lambda new: torch.cuda.set_rng_state(new, index))
    backend = getattr(torch, device.type, None)  # mps, xpu: one device per process
    if backend is None or not hasattr(backend, "get_rng_state") or not hasattr(backend, "set_rng_state"):
        return None
    return backend.get_rng_state, backend.set_rng_state


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
