"""Mixing ingredients into a soup.

Mixing rules are pure functions over tensors, registered by name (as mergekit does): a rule receives the
ingredients' values of one tensor (and the stock's, where it needs one) and returns the mixed tensor.
:func:`stream_soup` applies a rule tensor by tensor while reading one ingredient file at a time, so
peak memory is about two models whatever the number of ingredients.  Averages accumulate in float64;
non-float buffers (integer indices, masks) are copied from the first ingredient.
"""

from __future__ import annotations

import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from adaptsoup.core.checkpoint import CheckpointMeta, read_checkpoint
from adaptsoup.errors import AdaptsoupError

StateDict = dict[str, torch.Tensor]


class SoupError(AdaptsoupError):
    """Ingredients cannot be mixed (different architectures, keys or shapes; bad coefficients)."""


# --------------------------------------------------------------------------------------------------------------
# Weighted averages (the uniform soup is the weighted one with equal weights)


def normalise_weights(weights: Sequence[float] | torch.Tensor, count: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise SoupError(f"{w.numel()} mixing coefficients for {count} ingredients")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise SoupError(f"mixing coefficients must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise SoupError("mixing coefficients sum to zero")
    return w / total


def check_compatible(reference: StateDict, other: StateDict, name: str, ref_name: str = "the first ingredient") -> None:
    """Same keys, shapes and dtypes kinds, or a :class:`SoupError` naming the first differences."""
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    shapes = [f"{k} {tuple(other[k].shape)} vs {tuple(v.shape)}" for k, v in reference.items() if k in other and other[k].shape != v.shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}")
        if shapes:
            parts.append(f"mis-shaped {', '.join(shapes[:3])}")
        raise SoupError(f"{name} cannot be mixed with {ref_name}: " + "; ".join(parts))


def check_same_arch(metas: Sequence[CheckpointMeta | None], names: Sequence[str]) -> None:
    archs = {(m.arch if m else None) for m in metas}
    archs.discard(None)
    if len(archs) > 1:
        detail = ", ".join(f"{n}: {m.arch}" for n, m in zip(names, metas) if m is not None)
        raise SoupError(f"ingredients have different architectures ({detail})")


def stream_weighted_average(paths: Sequence[str | os.PathLike], weights: Sequence[float] | torch.Tensor | None = None) -> tuple[StateDict, CheckpointMeta | None]:
    """Σ_i w_i θ_i over checkpoint files, reading one file at a time (float64 accumulation).

    Returns the averaged state dict (in each tensor's original dtype) and the first ingredient's metadata.
    """
    if not paths:
        raise SoupError("no ingredients to mix")
    w = normalise_weights(weights if weights is not None else [1.0] * len(paths), len(paths))
    acc: StateDict = {}
    first: StateDict | None = None
    metas: list[CheckpointMeta | None] = []
    for i, path in enumerate(paths):
        state, meta = read_checkpoint(path)
        metas.append(meta)
        if first is None:
            first = {k: v for k, v in state.items()}
            acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
        else:
            check_compatible(first, state, Path(path).name, Path(paths[0]).name)
        check_same_arch(metas, [Path(p).name for p in paths[: i + 1]])
        for key, value in state.items():
            if key in acc:
                if float(w[i]) != 0.0:
                    acc[key].add_(value.to(torch.float64), alpha=float(w[i]))
        del state
    assert first is not None
    out = {k: (acc[k].to(v.dtype) if k in acc else v.clone()) for k, v in first.items()}
    return out, metas[0]


def weighted_average(states: Sequence[StateDict], weights: Sequence[float] | torch.Tensor | None = None) -> StateDict:
    """In-memory Σ_i w_i θ_i (float64 accumulation); non-float tensors copied from the first state."""
    if not states:
        raise SoupError("no ingredients to mix")
    w = normalise_weights(weights if weights is not None else [1.0] * len(states), len(states))
    for i, s in enumerate(states[1:], start=1):
        check_compatible(states[0], s, f"ingredient {i}")
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for wi, s in zip(w, states):
                acc.add_(s[key].to(torch.float64), alpha=float(wi))
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


# --------------------------------------------------------------------------------------------------------------
# Model Stock (Jang et al., 2024): a pure per-tensor rule, streamed


def model_stock_ratio(mean_cos: float, k: int, eps: float = 1e-6) -> tuple[float, bool]:
    """t = k·cos θ / (1 + (k−1)·cos θ), with cos θ clamped to [−1, 1] and t to [0, 1].

    Returns (t, clamped): ``clamped`` says a clamp or the denominator guard changed the value.
    """
    cos = min(1.0, max(-1.0, mean_cos))
    clamped = abs(cos - mean_cos) > eps  # float rounding just past ±1 is not worth reporting
    denom = 1.0 + (k - 1) * cos
    if abs(denom) < eps:
        return 0.0, True
    t = k * cos / denom
    if not -eps <= t <= 1.0 + eps:
        return min(1.0, max(0.0, t)), True
    t = min(1.0, max(0.0, t))
    return t, clamped


def stream_model_stock(paths: Sequence[str | os.PathLike], stock_path: str | os.PathLike) -> tuple[StateDict, dict]:
    """Model Stock per tensor: w = t·mean(w_i) + (1−t)·w_stock, t from the mean pairwise cosine of the deltas.

    Streams one ingredient at a time: with u_i = δ_i/|δ_i| the mean pairwise cosine is
    (|Σ u_i|² − k) / (k(k−1)), so only Σ u_i and Σ w_i are kept (float64).  Tensors whose deltas are all
    zero keep the stock's value.  Returns the state dict and per-tensor diagnostics.
    """
    k = len(paths)
    if k < 2:
        raise SoupError("Model Stock needs at least 2 ingredients")
    stock, _ = read_checkpoint(stock_path)
    sum_w: dict[str, torch.Tensor] = {}
    sum_u: dict[str, torch.Tensor] = {}
    nonzero: dict[str, int] = {}
    for path in paths:
        state, _ = read_checkpoint(path)
        check_compatible(stock, state, Path(path).name, "the stock")
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            w = value.to(torch.float64)
            delta = w - stock[key].to(torch.float64)
            norm = delta.norm()
            sum_w[key] = sum_w.get(key, torch.zeros_like(w)) + w
            if norm > 0:
                sum_u[key] = sum_u.get(key, torch.zeros_like(w)) + delta / norm
                nonzero[key] = nonzero.get(key, 0) + 1
        del state
    out: StateDict = {}
    info: dict = {"t": {}, "cos": {}, "clamped": []}
    for key, ref in stock.items():
        if key not in sum_w:
            out[key] = ref.clone()
            continue
        if nonzero.get(key, 0) < k:  # some ingredient did not move this tensor: no angle to measure
            cos = 1.0 if nonzero.get(key, 0) == 0 else float("nan")
        else:
            cos = float(((sum_u[key] * sum_u[key]).sum() - k) / (k * (k - 1)))
        if math.isnan(cos):
            t, clamped = 0.0, True
        else:
            t, clamped = model_stock_ratio(cos, k)
        mean = sum_w[key] / k
        out[key] = (t * mean + (1 - t) * ref.to(torch.float64)).to(ref.dtype)
        info["t"][key], info["cos"][key] = t, cos
        if clamped:
            info["clamped"].append(key)
    return out, info


# --------------------------------------------------------------------------------------------------------------
# Registry of mixing methods


@dataclass
class MixResult:
    """What a mixing method produced: the soup and what it learned (coefficients, diagnostics)."""

    state_dict: StateDict
    coefficients: list[float] | None
    info: dict = field(default_factory=dict)


@dataclass
class MixOptions:
    """Options of the data-driven methods (the paper's defaults)."""

    epochs: int = 100  # self-season
    subset: int = 0  # self-season: 0 = all target images
    batch_size: int = 256
    lr: float = 0.1
    min_lr: float = 0.01
    k: int = 16
    temperature: float = 0.07
    center: bool = False  # self-season: centre the embeddings before the cosines (not in the paper)
    samples: int = 1000  # season
    split: float = 0.5  # season / knn scoring: retrieval fraction
    seed: int = 0
    greedy_tie: str = "strict"
    score: str = "auto"  # greedy / best: "classifier", "knn" or "auto" (classifier when the classes match)
    include_stock: bool = False
    bf16: bool = False
    device: str = "cpu"  # where the learned methods hold the stacked ingredients and run the mixed model


@dataclass
class MixContext:
    """Everything a mixing method may use. ``target`` is unlabeled; ``labeled`` is the few-label set."""

    paths: list[Path]
    names: list[str]
    stock_path: Path | None = None
    arch: str | None = None
    target: object | None = None  # ImageSet
    labeled: object | None = None  # ImageSet
    options: MixOptions = field(default_factory=MixOptions)
    progress: object | None = None
    log: Callable[[str], None] = lambda message: None


MixFn = Callable[..., MixResult]
MIXERS: dict[str, MixFn] = {}
NEEDS: dict[str, str] = {}  # method -> what data it needs: "none", "target" or "labels"


def register_mixer(name: str, needs: str = "none") -> Callable[[MixFn], MixFn]:
    """Register ``fn(ctx) -> MixResult`` under ``name``; ``needs`` says which data it uses."""

    def wrap(fn: MixFn) -> MixFn:
        if name in MIXERS:
            raise ValueError(f"mixing method {name!r} registered twice")
        MIXERS[name] = fn
        NEEDS[name] = needs
        return fn

    return wrap


def get_mixer(name: str) -> MixFn:
    from adaptsoup.soup import seasoning_methods  # noqa: F401  (registers the data-driven methods)

    if name not in MIXERS:
        raise AdaptsoupError(f"unknown mixing method {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def mixer_names() -> list[str]:
    from adaptsoup.soup import seasoning_methods  # noqa: F401

    return sorted(MIXERS)


@register_mixer("uniform")
def mix_uniform(ctx) -> MixResult:
    """The uniform soup (Wortsman et al. 2022): the plain average of all ingredients, streamed."""
    state, _meta = stream_weighted_average(ctx.paths)
    n = len(ctx.paths)
    return MixResult(state_dict=state, coefficients=[1.0 / n] * n, info={})


@register_mixer("model-stock")
def mix_model_stock(ctx) -> MixResult:
    """Model Stock: interpolate between the ingredients' mean and the stock by their deltas' agreement."""
    if ctx.stock_path is None:
        raise AdaptsoupError("model-stock needs the stock (the model the ingredients were fine-tuned from)")
    state, info = stream_model_stock(ctx.paths, ctx.stock_path)
    ts = list(info["t"].values())
    summary = {
        "t_mean": sum(ts) / len(ts) if ts else None, "t_min": min(ts) if ts else None, "t_max": max(ts) if ts else None,
        "clamped_tensors": info["clamped"], "t_per_tensor": info["t"], "cos_per_tensor": info["cos"],
    }
    return MixResult(state_dict=state, coefficients=None, info=summary)
