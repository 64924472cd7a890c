"""LP-FT (Kumar et al., 2022): fit the head as a linear probe on frozen features, then fine-tune everything.

The probe is L2-regularised multinomial logistic regression on pre-logits features, solved to convergence
in float64 by Newton's method with preconditioned conjugate gradients (:func:`fit_logistic_regression`).
Converged, the fit is the problem's unique minimiser whatever the thread count or the world size; a fixed
budget of L-BFGS steps stopped short of it on the nearly separable features of a small source set, leaving
weights that depended on float rounding (a probe fitted under torchrun differed from one process's by 0.04).
The bias is regularised with the weights: unregularised, on separable features, it drifts to a large value
that the data barely pins down (on the demo's features 100 times as sensitive to a feature perturbation as
the weights).  The probe can be cached in a file, so the N fine-tunings of one encoder compute it once.
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
from adaptsoup.errors import AdaptsoupError
from adaptsoup.train.loop import TrainConfig, TrainResult, train
from adaptsoup.train.losses import classification_loss


@dataclass
class LinearProbeConfig:
    weight_decay: float = 1e-4
    max_iter: int = 100  # Newton steps (each solves for its direction with up to max_cg conjugate-gradient steps)
    max_cg: int = 1000
    tolerance_grad: float = 1e-10  # converged: the regularised objective's gradient has no entry larger than this
    batch_size: int = 256
    device: str = "cpu"
    bf16: bool = False


@dataclass
class ProbeFit:
    """The minimiser of :func:`probe_objective` that :func:`fit_logistic_regression` found, and how."""

    weight: torch.Tensor  # [classes, features], float64
    bias: torch.Tensor  # [classes], float64
    iterations: int  # Newton steps taken
    cg_steps: int  # conjugate-gradient steps (Hessian-vector products) in all
    converged: bool  # the gradient's largest entry is at most tolerance_grad
    gradient_max: float  # ... which is this
    objective: float

    def record(self) -> dict:
        return {"solver": "newton-cg (float64)", "iterations": self.iterations, "cg_steps": self.cg_steps,
                "converged": self.converged, "gradient_max": self.gradient_max, "objective": self.objective}


def probe_objective(feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``feats @ weight.T + bias`` plus ``weight_decay / 2 * (|weight|^2 + |bias|^2)``; returns
    (objective, its gradient in weight, in bias, the softmax probabilities), in closed form."""
    logits = feats @ weight.T + bias
    probs = torch.softmax(logits, dim=1)
    picked = logits.gather(1, labels[:, None]).squeeze(1)
    value = (torch.logsumexp(logits, dim=1) - picked).mean() + 0.5 * weight_decay * ((weight * weight).sum() + (bias * bias).sum())
    residual = probs.clone()
    residual[torch.arange(len(labels)), labels] -= 1.0
    residual /= len(labels)
    return value, residual.T @ feats + weight_decay * weight, residual.sum(0) + weight_decay * bias, probs


def _hessian_product(feats: torch.Tensor, probs: torch.Tensor, weight_decay: float, vw: torch.Tensor,
                     vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's Hessian (at the point whose softmax is ``probs``) times the direction (vw, vb)."""
    z = feats @ vw.T + vb
    r = probs * (z - (probs * z).sum(1, keepdim=True)) / len(feats)
    return r.T @ feats + weight_decay * vw, r.sum(0) + weight_decay * vb


def _dot(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float((a[0] * b[0]).sum() + (a[1] * b[1]).sum())


def _newton_direction(feats: torch.Tensor, probs: torch.Tensor, weight_decay: float, gw: torch.Tensor, gb: torch.Tensor,
                      max_cg: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve Hessian · d = −gradient by conjugate gradients, preconditioned by the Hessian's diagonal, to the
    truncated-Newton tolerance min(0.5, √|g|)·|g|; returns (d in weight, d in bias, steps)."""
    s = probs * (1.0 - probs) / len(feats)
    diag_w, diag_b = s.T @ (feats * feats) + weight_decay, s.sum(0) + weight_decay

    def precondition(rw: torch.Tensor, rb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rw / diag_w.clamp(min=1e-300), rb / diag_b.clamp(min=1e-300)

    r = (-gw, -gb)
    norm = _dot(r, r) ** 0.5
    target = min(0.5, norm ** 0.5) * norm
    d = (torch.zeros_like(gw), torch.zeros_like(gb))
    z = precondition(*r)
    p, rz = z, _dot(r, z)
    for step in range(1, max_cg + 1):
        hp = _hessian_product(feats, probs, weight_decay, *p)
        curvature = _dot(p, hp)
        if curvature <= 0.0:  # only rounding makes this happen (the Hessian is positive definite)
            return (*d, step) if step > 1 else (-gw, -gb, step)
        alpha = rz / curvature
        d = (d[0] + alpha * p[0], d[1] + alpha * p[1])
        r = (r[0] - alpha * hp[0], r[1] - alpha * hp[1])
        if _dot(r, r) ** 0.5 <= target:
            return (*d, step)
        z = precondition(*r)
        rz_next = _dot(r, z)
        p, rz = (z[0] + rz_next / rz * p[0], z[1] + rz_next / rz * p[1]), rz_next
    return (*d, max_cg)


def fit_logistic_regression(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iter: int = 100, tolerance_grad: float = 1e-10, max_cg: int = 1000) -> ProbeFit:
    """The minimiser of :func:`probe_objective` from zero weights, by Newton-CG with a backtracking (Armijo)
    line search, in float64; it stops when the gradient's largest entry is at most ``tolerance_grad``, after
    ``max_iter`` Newton steps, or when a step can no longer lower the objective (rounding)."""
    if weight_decay < 0 or max_iter < 1 or max_cg < 1 or not tolerance_grad > 0:
        raise AdaptsoupError(f"linear probe: weight decay must be >= 0, max_iter and max_cg >= 1, tolerance_grad > 0 "
                             f"(got {weight_decay}, {max_iter}, {max_cg}, {tolerance_grad})")
    if len(labels) == 0 or len(labels) != len(feats):
        raise AdaptsoupError(f"linear probe: {len(feats)} feature rows for {len(labels)} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise AdaptsoupError(f"linear probe: labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    x, y = feats.detach().double(), labels.detach().long().to(feats.device)
    if not bool(torch.isfinite(x).all()):
        raise AdaptsoupError("linear probe: the features hold NaN or inf values (has the encoder diverged?)")
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    value, gw, gb, probs = probe_objective(x, y, w, b, weight_decay)
    iterations = cg_steps = 0
    while True:
        gradient_max = float(torch.cat([gw.flatten(), gb]).abs().max())
        if gradient_max <= tolerance_grad or iterations >= max_iter:
            break
        dw, db, steps = _newton_direction(x, probs, weight_decay, gw, gb, max_cg)
        cg_steps, iterations = cg_steps + steps, iterations + 1
        slope, t = float((gw * dw).sum() + (gb * db).sum()), 1.0
        while t >= 1e-12:
            trial = probe_objective(x, y, w + t * dw, b + t * db, weight_decay)
            if float(trial[0]) <= float(value) + 1e-4 * t * slope:
                break
            t /= 2.0
        else:
            break  # no step lowers the objective: as close as float64 gets
        w, b = w + t * dw, b + t * db
        value, gw, gb, probs = trial
    return ProbeFit(weight=w, bias=b, iterations=iterations, cg_steps=cg_steps,
                    converged=gradient_max <= tolerance_grad, gradient_max=gradient_max, objective=float(value))


def fit_linear_probe(model: nn.Module, data: ImageSet, preprocess: Preprocess, cfg: LinearProbeConfig) -> dict:
    """Set ``model``'s head to the L2-regularised logistic-regression solution on frozen features.

    Features are extracted once (no augmentation); the head is fit by :func:`fit_logistic_regression`.
    Returns the probe's training loss and accuracy and the solver's record (iterations, converged, ...).
    """
    if data.labels is None:
        raise ValueError("the linear probe needs labels")
    feats = run_model(model, data, preprocess, want_logits=False, want_features=True, batch_size=cfg.batch_size, device=cfg.device, bf16=cfg.bf16).features
    feats = feats.double()
    labels = data.labels
    head = model.get_classifier()
    fit = fit_logistic_regression(feats, labels, head.out_features, cfg.weight_decay, cfg.max_iter, cfg.tolerance_grad, cfg.max_cg)
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight.dtype))
        head.bias.copy_(fit.bias.to(head.bias.dtype))
        logits = feats @ fit.weight.T + fit.bias
        loss = float(nn.functional.cross_entropy(logits, labels))
        acc = float((logits.argmax(1) == labels).double().mean() * 100)
    return {"train_loss": loss, "train_acc": acc, "feature_dim": int(feats.shape[1]), **fit.record()}


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
