"""One evaluation loop: logits, pre-logits features and top-1 accuracy of a model over an ImageSet, and the
scores of many checkpoints on many labeled sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess, eval_batches
from adaptsoup.core.models import load_model
from adaptsoup.core.progress import NullProgress


@dataclass
class Outputs:
    logits: torch.Tensor | None  # [N, C]
    features: torch.Tensor | None  # [N, D] pre-logits


@torch.no_grad()
def run_model(
    model: nn.Module,
    images: ImageSet,
    preprocess: Preprocess,
    *,
    want_logits: bool = True,
    want_features: bool = False,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> Outputs:
    """Forward every image once (eval mode); collect logits and/or pre-logits features."""
    was_training = model.training
    model.eval()
    logits, feats = [], []
    device = torch.device(device)
    for x, _ in eval_batches(images, preprocess, batch_size):
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = model.forward_features(x)
            pre = model.forward_head(tokens, pre_logits=True)
            if want_features:
                feats.append(pre.float().cpu())
            if want_logits:
                logits.append(model.get_classifier()(pre).float().cpu())
    model.train(was_training)
    return Outputs(
        logits=torch.cat(logits) if want_logits else None,
        features=torch.cat(feats) if want_features else None,
    )


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == labels).float().mean().item() * 100.0)


def accuracy(model: nn.Module, images: ImageSet, preprocess: Preprocess, **kwargs) -> float:
    if images.labels is None:
        raise ValueError("accuracy needs a labeled image set")
    return top1(run_model(model, images, preprocess, **kwargs).logits, images.labels)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    pred = logits.argmax(dim=1)
    out = []
    for c in range(num_classes):
        sel = labels == c
        out.append(float((pred[sel] == c).float().mean().item() * 100.0) if sel.any() else float("nan"))
    return out


def evaluate_checkpoints(candidates: dict[str, Path], evals: dict[str, ImageSet], pre: Preprocess, *,
                         arches: dict[str, str | None] | None = None, device: str = "cpu", bf16: bool = False, progress=None,
                         known: dict | None = None, score=top1, predictions: dict | None = None,
                         logits: dict | None = None) -> dict[str, dict[str, float]]:
    """Score each checkpoint on each labeled set: ``{eval_name: {model_name: score}}``, one model in memory.

    Pairs already in ``known`` are kept, not recomputed.  ``arches`` names the timm architecture of
    candidates whose checkpoint carries no adaptsoup metadata.  ``score(logits, labels)`` turns logits
    into a percentage (default: top-1 over the model's classes).  ``predictions``, if given, is filled
    with each evaluated model's per-image arg-max class, ``{eval_name: {model_name: int64 [N]}}`` (only
    for the pairs evaluated now, not those ``known`` held): the paired bootstrap's input.  ``logits``, if given, is
    filled likewise with their float32 logits ``{eval_name: {model_name: [N, C]}}``.
    """
    progress = progress or NullProgress()
    arches = arches or {}
    metrics: dict[str, dict[str, float]] = {k: dict(v) for k, v in (known or {}).items()}
    todo = {n: [e for e in evals if n not in metrics.get(e, {})] for n in candidates}  # only what is not known yet
    todo = {n: missing for n, missing in todo.items() if missing}
    task = progress.add_task("evaluate", total=sum(len(m) for m in todo.values()))
    for name, missing in todo.items():
        model = load_model(arches.get(name), candidates[name])
        for eval_name in missing:
            images = evals[eval_name]
            out = run_model(model, images, pre, device=device, bf16=bf16).logits
            metrics.setdefault(eval_name, {})[name] = score(out, images.labels)
            if predictions is not None:
                predictions.setdefault(eval_name, {})[name] = out.argmax(dim=1)
            if logits is not None:
                logits.setdefault(eval_name, {})[name] = out.float()
            progress.advance(task)
        del model
    progress.remove_task(task)
    return metrics
