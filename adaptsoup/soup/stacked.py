"""M ingredients in memory at once, mixed by coefficients: what the data-driven methods search over.

:class:`StackedIngredients` holds each float tensor of the M ingredients once, as ``[M, *shape]``, so that
the mixed model θ(α) = Σ_i α_i θ_i is one weighted sum per tensor, differentiable in α.
:func:`mixed_features` runs θ(α) on images without building a model per α (``torch.func.functional_call``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from adaptsoup.core.data import ImageSet, Preprocess, eval_batches
from adaptsoup.core.models import load_model
from adaptsoup.core.tensor_files import TensorFile, open_tensors
from adaptsoup.soup.checks import SoupError, check_compatible


class PreLogits(nn.Module):
    """``model`` up to its pre-logits features (timm's ``forward_head(pre_logits=True)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class StackedIngredients:
    """The float tensors of M ingredients stacked once as ``[M, *shape]``; ``mix(α)`` gives Σ α_i θ_i.

    Every file's header is checked first; then each tensor of each ingredient is read straight into its
    slot of the preallocated stack (:mod:`adaptsoup.core.tensor_files`: positioned reads, no memory map, no
    intermediate copy when the dtypes agree).  Memory, in units of one ingredient: the stack's M units plus
    one tensor.  Measured by ``python -m adaptsoup_bench.soup_memory`` (figures in benchmarks/README.md,
    "Memory of mixing"); it was 8.1 units for 4 ingredients when they were gathered in lists and then
    stacked, and 5.1 when each whole file was read before being copied into the stack.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if not paths:
            raise SoupError("no ingredients to mix")
        self.device = torch.device(device)
        self.count = len(paths)
        self.stacked: dict[str, torch.Tensor] = {}
        self.constants: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as files:
            tensors = [files.enter_context(open_tensors(p)) for p in paths]
            for other in tensors[1:]:
                check_compatible(tensors[0].templates, other.templates, other.name, tensors[0].name)
            self._allocate(tensors[0], dtype)
            for i, source in enumerate(tensors):
                for key, slots in self.stacked.items():
                    source.read_into(key, slots[i])

    def _allocate(self, first: TensorFile, dtype: torch.dtype) -> None:
        """Empty ``[M, *shape]`` stacks for the float tensors; the non-float ones read from the first ingredient."""
        for key, value in first.templates.items():
            if value.is_floating_point():
                self.stacked[key] = torch.empty((self.count, *value.shape), dtype=dtype, device=self.device)
            else:
                self.constants[key] = first.read(key).to(self.device, copy=True)

    def mix(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(α) = Σ_i α_i θ_i for every float tensor (differentiable in α); constants as they are."""
        alpha = alpha.to(device=self.device, dtype=next(iter(self.stacked.values())).dtype)
        out = {k: torch.tensordot(alpha, v, dims=1) for k, v in self.stacked.items()}
        out.update(self.constants)
        return out

    def state_dict(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """A detached float64-accumulated mix on the CPU, in the ingredients' dtype (for writing the soup)."""
        a = alpha.detach().to("cpu", torch.float64)
        out = {k: torch.tensordot(a, v.to("cpu", torch.float64), dims=1).to(v.dtype) for k, v in self.stacked.items()}
        out.update({k: v.to("cpu", copy=True) for k, v in self.constants.items()})
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.stacked.values())


def open_stack(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu") -> tuple[nn.Module, StackedIngredients, Preprocess]:
    """The first ingredient as a module to run mixes through, the stacked ingredients, and their preprocessing."""
    model = load_model(None, paths[0]).eval()
    return model, StackedIngredients(paths, device=device), Preprocess.for_model(model)


@torch.no_grad()
def mixed_features(model: nn.Module, stack: StackedIngredients, alpha: torch.Tensor, images: ImageSet, pre: Preprocess,
                   batch_size: int = 256, want: str = "features") -> torch.Tensor:
    """Pre-logits features (``want="features"``) or logits (``want="logits"``) of θ(α) on every image."""
    params = stack.mix(alpha)
    module = (PreLogits(model) if want == "features" else model).to(stack.device)
    prefix = "model." if want == "features" else ""
    params = {prefix + k: v for k, v in params.items()}
    outs = [functional_call(module, params, (x.to(stack.device),)).float().cpu() for x, _ in eval_batches(images, pre, batch_size)]
    return torch.cat(outs)
