"""Test-time adaptation over a stream of unlabeled images: one online pass (:func:`run_tta`), and a run
directory with the online predictions, the adapted model and a manifest (:func:`tta_run_dir`)."""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.core.io import write_atomic
from adaptsoup.core.manifest import Manifest, environment
from adaptsoup.core.models import class_names, load_model, model_meta
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.adapter import Adapter, StepRecord, TTAConfig


@dataclass
class TTAResult:
    logits: torch.Tensor  # [N, C] in the image set's order, each made before its batch's update
    order: torch.Tensor  # the stream order (indices into the image set)
    records: list[StepRecord] = field(default_factory=list)
    resets: int = 0
    guard_resets: int = 0  # resets of the drift guard (TTAConfig.guard)
    filtered_out: int = 0
    final_ema: float | None = None
    accuracy: float | None = None
    wall_s: float = 0.0


def run_tta(model: nn.Module, images: ImageSet, pre: Preprocess, cfg: TTAConfig,
            on_batch: Callable[[int, int], None] | None = None, fisher: ImageSet | None = None) -> tuple[TTAResult, Adapter]:
    """One online pass over ``images`` in a seeded order; labels, if any, are used only to score.  ``fisher``:
    EATA's in-distribution images for its Fisher term, in batches of the stream's size (None: ETA)."""
    t0 = time.perf_counter()
    fisher_batches = None
    if fisher is not None:
        fisher_batches = (pre.normalize(fisher.images[i : i + cfg.batch_size]) for i in range(0, len(fisher), cfg.batch_size))
    adapter = Adapter(model, cfg, fisher_batches=fisher_batches)
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
    result.guard_resets = sum(r.guard_reset for r in adapter.records)
    result.filtered_out = sum(r.size - r.passed_first for r in adapter.records)
    result.final_ema = adapter.ema
    if images.labels is not None:
        result.accuracy = float((logits.argmax(1) == images.labels).float().mean() * 100)
    result.wall_s = time.perf_counter() - t0
    return result, adapter


def write_predictions_csv(path: Path, images: ImageSet, result: TTAResult, names: list[str]) -> None:
    """``path,class,probability,stream_position[,label]``, one row per image in the image set's order, atomically."""
    probs = result.logits.softmax(dim=1)
    top = probs.argmax(dim=1)
    position = torch.empty_like(result.order)
    position[result.order] = torch.arange(len(result.order))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "probability", "stream_position"] + (["label"] if images.labels is not None else []))
            for i, rel in enumerate(images.paths):
                row = [rel, names[int(top[i])], f"{float(probs[i, top[i]]):.6f}", int(position[i])]
                if images.labels is not None:
                    row.append(names[int(images.labels[i])])
                writer.writerow(row)

    write_atomic(path, write)


GUARD_REASONS_SHOWN = 5  # the summary's first reasons for a guard reset (every one is in per_batch)


def guard_summary(cfg: TTAConfig, records: list[StepRecord]) -> dict:
    """The drift guard's part of a summary: whether it ran, its resets, the batches and first reasons."""
    fired = [r for r in records if r.guard_reset]
    return {"guard": cfg.guard, "guard_resets": len(fired), "guard_reset_batches": [r.batch for r in fired],
            "guard_reasons": [f"batch {r.batch}: {r.guard_reason}" for r in fired[:GUARD_REASONS_SHOWN]]}


def guard_log(records: list[StepRecord]) -> str:
    """``, 2 guard resets at batches 11, 30`` (``, no guard reset`` without any)."""
    batches = [str(r.batch) for r in records if r.guard_reset]
    if not batches:
        return ", no guard reset"
    shown = ", ".join(batches[:10]) + (", ..." if len(batches) > 10 else "")
    return f", {len(batches)} guard reset{'s at batches' if len(batches) > 1 else ' at batch'} {shown}"


def run_summary(cfg: TTAConfig, adapter: Adapter, result: TTAResult) -> dict:
    """What the manifest records of a pass: settings that were derived, counts, and every step."""
    return {
        "method": cfg.method, "lr": cfg.lr(), "e0": adapter.e0, "batches": len(result.records), "resets": result.resets,
        **guard_summary(cfg, result.records),
        "filtered_out_first": result.filtered_out, "skipped_updates": sum(r.skipped for r in result.records),
        "final_ema": result.final_ema, "online_accuracy": result.accuracy, "wall_s": round(result.wall_s, 2),
        **(adapter.state.describe() if adapter.state is not None else {}),
        "per_batch": [dataclasses.asdict(r) for r in result.records],
    }


def load_fisher_images(cfg: TTAConfig, pre: Preprocess, progress, log: Callable[[str], None]) -> ImageSet | None:
    """EATA's Fisher images: ``cfg.fisher_images`` (a folder, labels unused), at most ``fisher_size`` of them
    (a seeded subset).  None, and a log line saying the run is ETA, when there are none."""
    if cfg.method != "eata":
        if cfg.fisher_images:
            log(f"{cfg.method}: --source ({cfg.fisher_images}) is only used by eata; ignored")
        return None
    if not cfg.fisher_images or cfg.fisher_alpha <= 0:
        why = "fisher_alpha is 0" if cfg.fisher_images else "no in-distribution images (--source) for its Fisher term"
        log(f"eata: {why}: running ETA, EATA without the anti-forgetting term")
        return None
    images = load_folder(cfg.fisher_images, pre, progress=progress, description="decode Fisher images")
    if len(images) > cfg.fisher_size:
        images = images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.fisher_size])
    log(f"eata: Fisher information from {len(images)} image(s) of {cfg.fisher_images}")
    return images


def tta_run_dir(model_path: str, out_dir: str, cfg: TTAConfig, *, target: str | None = None, eval_labels: str | None = None,
                arch: str | None = None, progress=None, log: Callable[[str], None] = print) -> dict:
    """Adapt ``model_path`` over a folder and write ``predictions.csv``, ``adapted.safetensors``, ``manifest.json``.

    The stream is ``eval_labels`` when given (an ImageFolder whose labels only score the online predictions),
    else the unlabeled ``target`` folder.
    """
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
        log(f"skipped {len(images.skipped)} file(s) (unreadable or not images)")
    manifest = Manifest.load_or_new(out / "manifest.json", kind="tta")
    manifest.data.update(config=dataclasses.asdict(cfg), model=str(model_path), stream=str(eval_labels or target),
                         environment=environment(), data={"images": len(images), "skipped": len(images.skipped)})
    fisher = load_fisher_images(cfg, pre, progress, log)
    task = progress.add_task(f"{cfg.method} online", total=None)
    result, adapter = run_tta(model, images, pre, cfg, on_batch=lambda b, n: progress.update(task, total=n, completed=b),
                              fisher=fisher)
    progress.remove_task(task)
    write_predictions_csv(out / "predictions.csv", images, result, names)
    adapted = adapter.model.cpu()
    for p in adapted.parameters():
        p.requires_grad_(False)
    meta = model_meta(adapted, made_by="adaptsoup tta", stage="tta", method=cfg.method, parents=[str(model_path)])
    save_checkpoint(out / "adapted.safetensors", adapted.state_dict(), meta)
    summary = run_summary(cfg, adapter, result)
    manifest.data["result"] = summary
    manifest.save()
    log(f"{cfg.method}: {len(result.records)} batches, {result.filtered_out} samples filtered out, {result.resets} reset(s)"
        + (guard_log(result.records) if cfg.guard else "")
        + (f", online accuracy {result.accuracy:.2f}%" if result.accuracy is not None else ""))
    return summary
