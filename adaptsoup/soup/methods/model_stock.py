"""Model Stock (Jang et al., 2024): per tensor, interpolate between the ingredients' mean and the stock.

For each tensor, with δ_i = θ_i − θ_stock the ingredients' deltas and cos θ their mean pairwise cosine,
t = k·cos θ / (1 + (k−1)·cos θ) and the soup is t·mean(θ_i) + (1−t)·θ_stock: deltas that agree move the
soup towards the mean, deltas that disagree keep it near the stock.  An ingredient identical to the stock
(``mix --include-stock``) has no direction; it is left out, and the log and the info name it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.checks import SoupError, check_compatible
from adaptsoup.soup.registry import MixContext, MixResult, register

StateDict = dict[str, torch.Tensor]


@dataclass
class ModelStockOptions:
    """Model Stock has no options: everything follows from the ingredients' angles to the stock."""


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
    return min(1.0, max(0.0, t)), clamped


@dataclass
class DeltaSums:
    """Running float64 sums over the ingredients, per float tensor: Σ θ_i, Σ δ_i/|δ_i|, and how many moved it.

    With u_i = δ_i/|δ_i| the mean pairwise cosine is (|Σ u_i|² − k) / (k(k−1)), so these suffice.
    """

    weights: dict[str, torch.Tensor]
    directions: dict[str, torch.Tensor]
    moved: dict[str, int]
    count: int = 0

    @classmethod
    def empty(cls) -> "DeltaSums":
        return cls({}, {}, {})

    def add(self, state: StateDict, stock: StateDict) -> None:
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            w = value.to(torch.float64)
            delta = w - stock[key].to(torch.float64)
            norm = delta.norm()
            self.weights.setdefault(key, torch.zeros_like(w)).add_(w)
            if norm > 0:
                self.directions.setdefault(key, torch.zeros_like(w)).add_(delta / norm)
                self.moved[key] = self.moved.get(key, 0) + 1
        self.count += 1

    def mean_cosine(self, key: str) -> float:
        """The deltas' mean pairwise cosine for ``key``; 1 if none moved it, NaN if only some did (no angle)."""
        k, moved = self.count, self.moved.get(key, 0)
        if moved == 0:
            return 1.0
        if moved < k:
            return float("nan")
        u = self.directions[key]
        return float(((u * u).sum() - k) / (k * (k - 1)))


def _equals_stock(state: StateDict, stock: StateDict) -> bool:
    return all(torch.equal(v, stock[k]) for k, v in state.items() if v.is_floating_point())


def stream_model_stock(paths: Sequence[str | os.PathLike], stock_path: str | os.PathLike,
                       names: Sequence[str] | None = None) -> tuple[StateDict, dict]:
    """Model Stock per tensor, reading one ingredient at a time.

    Ingredients identical to the stock are left out (listed in ``info["excluded"]``).  Tensors no
    ingredient moved keep the stock's value; tensors only some moved have no angle to measure and keep
    it too (t = 0, listed as clamped).  Returns the state dict and per-tensor diagnostics.
    """
    names = list(names) if names is not None else [Path(p).name for p in paths]
    if len(paths) < 2:
        raise SoupError("Model Stock needs at least 2 ingredients")
    stock, _ = read_checkpoint(stock_path)
    sums, excluded = DeltaSums.empty(), []
    for path, name in zip(paths, names):
        state, _ = read_checkpoint(path)
        check_compatible(stock, state, name, "the stock")
        if _equals_stock(state, stock):
            excluded.append(name)
        else:
            sums.add(state, stock)
        del state
    if sums.count < 2:
        raise SoupError(f"Model Stock needs at least 2 ingredients that differ from the stock; {', '.join(excluded)} equal(s) it")
    out: StateDict = {}
    info: dict = {"t": {}, "cos": {}, "clamped": [], "excluded": excluded}
    for key, ref in stock.items():
        if key not in sums.weights:
            out[key] = ref.clone()
            continue
        cos = sums.mean_cosine(key)
        t, clamped = (0.0, True) if math.isnan(cos) else model_stock_ratio(cos, sums.count)
        mean = sums.weights[key] / sums.count
        out[key] = (t * mean + (1 - t) * ref.to(torch.float64)).to(ref.dtype)
        info["t"][key], info["cos"][key] = t, cos
        if clamped:
            info["clamped"].append(key)
    return out, info


@register("model-stock", ModelStockOptions)
def mix_model_stock(ctx: MixContext, options: ModelStockOptions) -> MixResult:
    """Model Stock: interpolate between the ingredients' mean and the stock by their deltas' agreement."""
    if ctx.stock_path is None:
        raise AdaptsoupError("model-stock needs the stock (the model the ingredients were fine-tuned from)")
    state, info = stream_model_stock(ctx.paths, ctx.stock_path, ctx.names)
    if info["excluded"]:
        ctx.log(f"model-stock: left out {', '.join(info['excluded'])}: identical to the stock, a zero delta has no direction")
    ts = list(info["t"].values())
    summary = {
        "t_mean": sum(ts) / len(ts) if ts else None, "t_min": min(ts) if ts else None, "t_max": max(ts) if ts else None,
        "clamped_tensors": info["clamped"], "excluded": info["excluded"], "t_per_tensor": info["t"], "cos_per_tensor": info["cos"],
    }
    return MixResult(state_dict=state, coefficients=None, info=summary)
