"""Mixing ingredients into a soup.

Mixing rules are pure functions over tensors, registered by name (as mergekit does): a rule receives the
ingredients' values of one tensor (and the stock's, where it needs one) and returns the mixed tensor.
:func:`stream_soup` applies a rule tensor by tensor while reading one ingredient file at a time, so
peak memory is about two models whatever the number of ingredients.  Averages accumulate in float64;
non-float buffers (integer indices, masks) are copied from the first ingredient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import CheckpointMeta, read_checkpoint
from .errors import AdaptsoupError

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
# Registry of mixing methods


@dataclass
class MixResult:
    """What a mixing method produced: the soup and what it learned (coefficients, diagnostics)."""

    state_dict: StateDict
    coefficients: list[float] | None
    info: dict = field(default_factory=dict)


MixFn = Callable[..., MixResult]
MIXERS: dict[str, MixFn] = {}


def register_mixer(name: str) -> Callable[[MixFn], MixFn]:
    def wrap(fn: MixFn) -> MixFn:
        if name in MIXERS:
            raise ValueError(f"mixing method {name!r} registered twice")
        MIXERS[name] = fn
        return fn

    return wrap


def get_mixer(name: str) -> MixFn:
    if name not in MIXERS:
        raise AdaptsoupError(f"unknown mixing method {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


@register_mixer("uniform")
def mix_uniform(paths: Sequence[str | os.PathLike], **_: object) -> MixResult:
    """The uniform soup (Wortsman et al. 2022): the plain average of all ingredients, streamed."""
    state, _meta = stream_weighted_average(paths)
    n = len(paths)
    return MixResult(state_dict=state, coefficients=[1.0 / n] * n, info={})
