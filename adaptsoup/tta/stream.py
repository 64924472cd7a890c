"""Test-time adaptation on a stream of unlabeled images: SAR (Niu et al., ICLR 2023) and Tent (Wang et al., 2021).

SAR, as in its official implementation (with its known defects fixed, see ``shared/reference``):

* loss: softmax entropy of the reliable samples only — entropy below E0 = 0.4·ln C at the first forward
  and, among those, again at the second (perturbed) forward;
* sharpness-aware update (SAM, ρ = 0.05) around SGD with momentum 0.9: ascend to w + e(w) with the first
  gradient, take the filtered entropy there, descend from w with that second gradient;
* model recovery: ema ← 0.9·ema + 0.1·loss₂; below 0.2 the model and optimizer are reset to their initial
  state, and the moving average restarts (the reference forgets to restart it);
* parameters: affine weight and bias of the LayerNorms of all blocks but the top quarter (ViT-B/12:
  blocks 0–8), selected by module position, not by name (the reference's substring match lets ``fc_norm``
  through); the final ``norm``/``fc_norm`` are frozen;
* a step in which no sample passes the filter is skipped (the reference steps on an empty mean);
* the model stays in eval mode with gradients on (the reference's train mode turns on stochastic depth);
* predictions are the logits of the first forward, made before the batch's update.

Tent minimises the entropy of all predictions, updating every LayerNorm's affine parameters, with SGD
(momentum 0.9, its ImageNet setting) or Adam (lr 1e-3 at batch 200, its CIFAR setting).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.errors import AdaptsoupError
from adaptsoup.core.models import require_vit

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
        if self.base_lr is not None:
            base = self.base_lr
        elif self.method == "sar":
            base = 1e-3
        else:
            base = 1e-3 / 200 * 64 if self.optimizer == "adam" else 2.5e-4  # Tent's CIFAR Adam: 1e-3 at batch 200
        return base / 64 * self.batch_size


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits)."""
    log_p = logits.float().log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def reliable(entropy: torch.Tensor, e0: float) -> torch.Tensor:
    """SAR's filter: the samples whose entropy is below E0."""
    return entropy < e0


def update_ema(ema: float | None, loss: float, momentum: float = 0.9) -> float:
    return loss if ema is None else momentum * ema + (1 - momentum) * loss


def norm_parameters(model: nn.Module, method: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters TTA updates: LayerNorm affine weights/biases (SAR: blocks below the top quarter)."""
    vit = require_vit(model, "test-time adaptation")
    if method == "tent":
        modules = [(n, m) for n, m in vit.named_modules() if isinstance(m, nn.LayerNorm)]
    elif method == "sar":
        depth = len(vit.blocks)
        keep = depth - math.ceil(depth / 4)
        modules = [(f"blocks.{i}.{n}", m) for i, blk in enumerate(vit.blocks) if i < keep
                   for n, m in blk.named_modules() if isinstance(m, nn.LayerNorm)]
        if isinstance(getattr(vit, "norm_pre", None), nn.LayerNorm):
            modules.insert(0, ("norm_pre", vit.norm_pre))
    else:
        raise AdaptsoupError(f"unknown TTA method {method!r}; choose one of {', '.join(TTA_METHODS)}")
    params = []
    for name, module in modules:
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                params.append((f"{name}.{pname}", p))
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
        if cfg.optimizer not in ("sgd", "adam") or (cfg.optimizer == "adam" and cfg.method != "tent"):
            raise AdaptsoupError(f"optimizer must be sgd, or adam for tent; got {cfg.optimizer!r} for {cfg.method}")
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr(), betas=(0.9, 0.999))
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr(), momentum=cfg.momentum)
        self.e0 = cfg.e0_factor * math.log(model.num_classes)
        self.ema: float | None = None
        self.records: list[StepRecord] = []
        self._initial_model = copy.deepcopy(self.model.state_dict())
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
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
        logits = self.model(x)
        loss = softmax_entropy(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.records.append(StepRecord(len(self.records), len(x), len(x), len(x), float(loss.detach()), None, False, False))
        return logits

    def _sar_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        ent = softmax_entropy(logits)
        first = reliable(ent, self.e0)
        record = StepRecord(len(self.records), len(x), int(first.sum()), 0, None, self.ema, False, True)
        self.records.append(record)
        self.optimizer.zero_grad(set_to_none=True)
        if not first.any():
            return logits  # nothing reliable: no update (the reference would step on an empty mean)
        ent[first].mean().backward()
        weights = sam_ascend(self.params, self.cfg.rho)
        self.optimizer.zero_grad(set_to_none=True)
        ent2 = softmax_entropy(self.model(x[first]))  # per-sample in eval mode: the reliable ones are all it needs
        second = reliable(ent2, self.e0)
        record.passed_second = int(second.sum())
        if not second.any():
            sam_restore(self.params, weights)
            return logits
        loss2 = ent2[second].mean()
        loss2.backward()
        sam_restore(self.params, weights)
        self.optimizer.step()  # descend from w with the gradient taken at w + e(w)
        self.optimizer.zero_grad(set_to_none=True)
        record.loss, record.skipped = float(loss2.detach()), False
        if math.isfinite(record.loss):
            self.ema = update_ema(self.ema, record.loss, self.cfg.ema_momentum)
        record.ema = self.ema
        if self.ema is not None and self.ema < self.cfg.reset_threshold:
            self.reset()
            record.reset = True
        return logits


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
class TTAResult:
    logits: torch.Tensor  # [N, C] in the image set's order, each made before its batch's update
    order: torch.Tensor  # the stream order (indices into the image set)
    records: list[StepRecord] = field(default_factory=list)
    resets: int = 0
    filtered_out: int = 0
    final_ema: float | None = None
    accuracy: float | None = None
    wall_s: float = 0.0


def run_tta(model: nn.Module, images: ImageSet, pre: Preprocess, cfg: TTAConfig,
            on_batch: Callable[[int, int], None] | None = None) -> tuple[TTAResult, Adapter]:
    """One online pass over ``images`` in a seeded order; labels, if any, are used only to score."""
    import time

    t0 = time.perf_counter()
    adapter = Adapter(model, cfg)
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)) if cfg.shuffle else torch.arange(n)
    logits = torch.zeros(n, model.num_classes)
    batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    for b, idx in enumerate(batches):
        logits[idx] = adapter.predict_and_adapt(pre.normalize(images.images[idx]))
        if on_batch is not None:
            on_batch(b + 1, len(batches))
    result = TTAResult(logits=logits, order=order, records=adapter.records)
    result.resets = sum(r.reset for r in adapter.records)
    result.filtered_out = sum(r.size - r.passed_first for r in adapter.records)
    result.final_ema = adapter.ema
    if images.labels is not None:
        result.accuracy = float((logits.argmax(1) == images.labels).float().mean() * 100)
    result.wall_s = time.perf_counter() - t0
    return result, adapter


def tta_run_dir(model_path: str, out_dir: str, cfg: TTAConfig, *, target: str | None = None, eval_labels: str | None = None,
                arch: str | None = None, progress=None, log: Callable[[str], None] = print) -> dict:
    """Adapt ``model_path`` over a folder and write ``predictions.csv``, ``adapted.safetensors``, ``manifest.json``.

    The stream is ``eval_labels`` when given (an ImageFolder whose labels only score the online predictions),
    else the unlabeled ``target`` folder.
    """
    import csv
    import dataclasses
    from pathlib import Path

    from adaptsoup.core.checkpoint import save_checkpoint
    from adaptsoup.core.data import load_folder
    from adaptsoup.core.io import write_atomic
    from adaptsoup.core.manifest import Manifest, environment
    from adaptsoup.core.models import class_names, load_model, model_meta
    from adaptsoup.core.progress import NullProgress

    if (target is None) == (eval_labels is None):
        raise AdaptsoupError("give the stream as --target DIR (unlabeled) or --eval-labels DIR (labeled, to score), not both")
    progress = progress or NullProgress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(arch, model_path)
    pre = Preprocess.for_model(model)
    names = class_names(model)
    images = load_folder(eval_labels or target, pre, labeled=eval_labels is not None, class_names=names if eval_labels else None,
                         progress=progress, description="decode stream")
    if images.skipped:
        log(f"skipped {len(images.skipped)} unreadable file(s)")
    manifest = Manifest.load_or_new(out / "manifest.json", kind="tta")
    manifest.data.update(config=dataclasses.asdict(cfg), model=str(model_path), stream=str(eval_labels or target),
                         environment=environment(), data={"images": len(images), "skipped": len(images.skipped)})
    task = progress.add_task(f"{cfg.method} online", total=None)
    result, adapter = run_tta(model, images, pre, cfg, on_batch=lambda b, n: progress.update(task, total=n, completed=b))
    progress.remove_task(task)
    probs = result.logits.softmax(dim=1)
    top = probs.argmax(dim=1)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "probability", "stream_position"] + (["label"] if images.labels is not None else []))
            position = torch.empty_like(result.order)
            position[result.order] = torch.arange(len(result.order))
            for i, rel in enumerate(images.paths):
                row = [rel, names[int(top[i])], f"{float(probs[i, top[i]]):.6f}", int(position[i])]
                if images.labels is not None:
                    row.append(names[int(images.labels[i])])
                writer.writerow(row)

    write_atomic(out / "predictions.csv", write_csv)
    adapted = adapter.model.cpu()
    for p in adapted.parameters():
        p.requires_grad_(False)
    meta = model_meta(adapted, made_by="adaptsoup tta", stage="tta", method=cfg.method, parents=[str(model_path)])
    save_checkpoint(out / "adapted.safetensors", adapted.state_dict(), meta)
    summary = {
        "method": cfg.method, "lr": cfg.lr(), "e0": adapter.e0, "batches": len(result.records), "resets": result.resets,
        "filtered_out_first": result.filtered_out, "skipped_updates": sum(r.skipped for r in result.records),
        "final_ema": result.final_ema, "online_accuracy": result.accuracy, "wall_s": round(result.wall_s, 2),
        "per_batch": [dataclasses.asdict(r) for r in result.records],
    }
    manifest.data["result"] = summary
    manifest.save()
    log(f"{cfg.method}: {len(result.records)} batches, {result.filtered_out} samples filtered out, {result.resets} reset(s)"
        + (f", online accuracy {result.accuracy:.2f}%" if result.accuracy is not None else ""))
    return summary
