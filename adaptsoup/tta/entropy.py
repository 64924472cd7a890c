"""What SAR and Tent share: the entropy they minimise and the LayerNorm affine parameters they update."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits)."""
    log_p = logits.float().log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def affine_parameters(modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Parameter]]:
    """The ``weight`` and ``bias`` parameters of ``(name, module)`` pairs, named ``name.weight`` / ``name.bias``."""
    params = []
    for name, module in modules:
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                params.append((f"{name}.{pname}", p))
    return params
