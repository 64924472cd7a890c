"""When ingredients can be mixed: same keys and shapes, one architecture, valid mixing weights."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adaptsoup.core.checkpoint import CheckpointMeta
from adaptsoup.errors import AdaptsoupError


class SoupError(AdaptsoupError):
    """Ingredients cannot be mixed (different architectures, keys or shapes; bad coefficients)."""


def normalise_weights(weights: Sequence[float] | torch.Tensor, count: int) -> torch.Tensor:
    """``weights`` as float64 summing to 1; refuses a wrong count, negatives, NaN/inf and an all-zero vector."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise SoupError(f"{w.numel()} mixing coefficients for {count} ingredients")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise SoupError(f"mixing coefficients must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise SoupError("mixing coefficients sum to zero")
    return w / total


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], name: str,
                     ref_name: str = "the first ingredient") -> None:
    """Same keys and shapes, or a :class:`SoupError` naming the first differences.

    Only keys and shapes are read, so ``reference`` may hold ``meta`` tensors (a template without data).
    """
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
    """One timm architecture among the ingredients that carry metadata."""
    archs = {(m.arch if m else None) for m in metas}
    archs.discard(None)
    if len(archs) > 1:
        detail = ", ".join(f"{n}: {m.arch}" for n, m in zip(names, metas) if m is not None)
        raise SoupError(f"ingredients have different architectures ({detail})")
