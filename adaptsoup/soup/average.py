"""The weighted average of ingredients, Σ_i w_i θ_i: streamed from checkpoint files, or in memory.

Float tensors accumulate in float64 and are cast back to their own dtype at the end; non-float buffers
(integer indices, masks) are copied from the first ingredient.  The uniform soup is the average with
equal weights.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Mapping, Sequence

import torch

from adaptsoup.core.checkpoint import CheckpointMeta
from adaptsoup.core.tensor_files import TensorFile, open_tensors
from adaptsoup.soup.checks import SoupError, check_compatible, check_same_arch, normalise_weights

StateDict = dict[str, torch.Tensor]
Weights = Sequence[float] | torch.Tensor


def stream_weighted_average(paths: Sequence[str | os.PathLike], weights: Weights | None = None) -> tuple[StateDict, CheckpointMeta | None]:
    """Σ_i w_i θ_i over checkpoint files, one tensor at a time (float64 accumulation).

    Returns the averaged state dict (in each tensor's original dtype) and the first ingredient's metadata.
    Every file's header is checked (keys, shapes, architecture) before any tensor is read.  Then, tensor by
    tensor, each ingredient's copy is read (:mod:`adaptsoup.core.tensor_files`: positioned reads, no memory
    map) and added into a float64 sum that is cast back at once.  The sums are added in ingredient order,
    so the result is bit for bit that of summing whole state dicts one file after the other.

    Memory, in units of one float32 ingredient: the result (1 unit) plus one tensor's float64 sum and read
    buffer, whatever the number of ingredients.  Measured by ``python -m adaptsoup_bench.soup_memory``
    (one fresh process per measurement, :class:`~adaptsoup.core.resources.PeakMemory`); the figures are in
    benchmarks/README.md ("Memory of mixing").  Ingredients in other formats (``.pt``) are read whole and
    all held while mixing (one unit each).
    """
    if not paths:
        raise SoupError("no ingredients to mix")
    w = normalise_weights(weights if weights is not None else [1.0] * len(paths), len(paths))
    with contextlib.ExitStack() as files:
        tensors = [files.enter_context(open_tensors(p)) for p in paths]
        reference = _check_headers(tensors)
        scratch = _Scratch()
        out: StateDict = {}
        for key, ref in reference.items():
            if not ref.is_floating_point():
                out[key] = tensors[0].read(key).clone()
                continue
            total = scratch.take(torch.float64, ref.shape).zero_()
            for wi, source in zip(w.tolist(), tensors):
                if wi != 0.0:
                    read = scratch.take(source.templates[key].dtype, ref.shape, slot=1)
                    source.read_into(key, read)
                    wide = scratch.take(torch.float64, ref.shape, slot=2)
                    wide.copy_(read)  # an explicit cast into a reused buffer: add_ would allocate a float64 temporary
                    total.add_(wide, alpha=wi)
            out[key] = total.to(ref.dtype)
        return out, tensors[0].meta


class _Scratch:
    """Reusable buffers, grown to the largest tensor: one allocation instead of two per tensor, so freed
    temporaries cannot pile up in the allocator (which is what made the peak vary by a unit)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def take(self, dtype: torch.dtype, shape: torch.Size, slot: int = 0) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get((dtype, slot))
        if buffer is None or buffer.numel() < numel:
            self.buffers[(dtype, slot)] = buffer = torch.empty(max(numel, 1), dtype=dtype)
        return buffer[:numel].view(shape)


def _check_headers(tensors: Sequence[TensorFile]) -> dict[str, torch.Tensor]:
    """The first ingredient's template, after checking every ingredient's keys, shapes and architecture against it."""
    reference = tensors[0].templates
    for i, other in enumerate(tensors[1:], start=1):
        check_compatible(reference, other.templates, other.name, tensors[0].name)
    check_same_arch([t.meta for t in tensors], [t.name for t in tensors])
    return reference


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Weights | None = None) -> StateDict:
    """In-memory Σ_i w_i θ_i (float64 accumulation); non-float tensors copied from the first state."""
    if not states:
        raise SoupError("no ingredients to mix")
    w = normalise_weights(weights if weights is not None else [1.0] * len(states), len(states))
    for i, s in enumerate(states[1:], start=1):
        check_compatible(states[0], s, f"ingredient {i}")
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            total = torch.zeros(ref.shape, dtype=torch.float64)
            for wi, s in zip(w, states):
                total.add_(s[key].to(torch.float64), alpha=float(wi))
            out[key] = total.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out
