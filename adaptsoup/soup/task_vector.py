"""Task arithmetic across two models of one lineage: ``target + scale · (tuned − base)``.

Under the paper's protocol the deployed model D is a fine-tune of a pre-trained encoder P, and inter-training
moves P to I on the unlabeled target.  The paper fine-tunes I back on the labeled source, a full fine-tune
per ingredient.  Task arithmetic (Ilharco et al., 2023) offers a label-free shortcut: if fine-tuning and
inter-training move the weights roughly additively from P, then FineTune(I) ≈ D + (I − P): the deployed
model plus the *target task vector* of inter-training.  :func:`add_task_vector` is that rule, per tensor.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

import torch
from torch import nn

from adaptsoup.core.models import with_pretrained_encoder
from adaptsoup.soup.checks import SoupError

StateDict = dict[str, torch.Tensor]


def add_task_vector(target: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                    scale: float = 1.0, keep: tuple[str, ...] = ("head.",)) -> StateDict:
    """``target + scale · (tuned − base)`` on every float tensor of ``target`` (float64 arithmetic, cast back).

    Tensors whose name starts with a prefix in ``keep`` (the classifier head: the base's is untrained) and
    non-float buffers are copied from ``target``.  Every other tensor must be in ``base`` and ``tuned`` with
    ``target``'s shape; a one-line :class:`SoupError` names the first that is not.
    """
    out: StateDict = {}
    for key, value in target.items():
        if key.startswith(keep) or not value.is_floating_point():
            out[key] = value.clone()
            continue
        for name, other in (("base", base), ("tuned", tuned)):
            if key not in other or tuple(other[key].shape) != tuple(value.shape):
                found = tuple(other[key].shape) if key in other else "missing"
                raise SoupError(f"task vector: {key} {tuple(value.shape)} has no counterpart in the {name} model ({found})")
        delta = tuned[key].to(torch.float64) - base[key].to(torch.float64)
        out[key] = (value.to(torch.float64) + scale * delta).to(value.dtype)
    return out


def onto_deployed(deployed: nn.Module, pretrained: str | os.PathLike, tuned: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """``deployed + scale · (tuned − pretrained)``: the task vector of a model trained from the pre-trained
    checkpoint (in the deployed model's architecture, its head left out) added to the deployed model."""
    base = with_pretrained_encoder(copy.deepcopy(deployed), pretrained).state_dict()
    return add_task_vector(deployed.state_dict(), base, tuned, scale)
