"""LP-FT (Kumar et al., 2022): fit the head as a linear probe on frozen features, then fine-tune everything.

The probe is L2-regularised logistic regression on pre-logits features, fit by full-batch L-BFGS; it can
be cached in a file, so the N fine-tunings of one encoder compute it once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, MutableMapping

import torch
from torch import nn

from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import model_meta
from adaptsoup.train.loop import TrainConfig, TrainResult, train
from adaptsoup.train.losses import classification_loss


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


def cached_linear_probe(model: nn.Module, data: ImageSet, preprocess: Preprocess, cfg: LinearProbeConfig, cache: Path) -> tuple[dict, bool]:
    """:func:`fit_linear_probe`, or the head stored in ``cache`` by an earlier call; returns (probe record, fitted now)."""
    if cache.is_file():
        state, meta = read_checkpoint(cache)
        model.get_classifier().load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        return (dict(meta.provenance.get("probe", {})) if meta else {}), False
    t0 = time.perf_counter()
    probe = fit_linear_probe(model, data, preprocess, cfg)
    probe["wall_s"] = time.perf_counter() - t0
    head = {f"head.{k}": v for k, v in model.get_classifier().state_dict().items()}
    save_checkpoint(cache, head, dataclasses.replace(model_meta(model), provenance={"probe": probe}))
    return probe, True


def linear_probe_then_finetune(model: nn.Module, data: ImageSet, preprocess: Preprocess, probe: LinearProbeConfig, finetune: TrainConfig,
                               *, label_smoothing: float, probe_cache: Path, state_path: Path, progress=None, description: str = "fine-tune",
                               on_step: Callable[[int, float], None] | None = None,
                               on_probe: Callable[[dict], None] | None = None,
                               precision_memo: MutableMapping[str, str] | None = None) -> tuple[dict, TrainResult]:
    """LP-FT on labeled ``data``: the cached linear probe sets the head, then every parameter is fine-tuned
    (resumable from ``state_path``).  ``on_probe(record)`` is told about a probe fitted by this call."""
    record, fitted = cached_linear_probe(model, data, preprocess, probe, probe_cache)
    if fitted and on_probe is not None:
        on_probe(record)
    result = train(model, classification_loss(label_smoothing), data, preprocess, finetune, state_path=state_path,
                   progress=progress, description=description, on_step=on_step, precision_memo=precision_memo)
    return record, result
