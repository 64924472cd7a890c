"""MoCo v3 (Chen, Xie & He, 2021) for inter-training.

2-layer MLP projector and predictor; symmetric InfoNCE with in-batch negatives, ``ctr(q1, k2) + ctr(q2, k1)``
with ``ctr(q, k) = CE(q·kᵀ/τ, diag) · 2τ`` as in the reference.  As in the paper there is no momentum
encoder: the online encoder gives both sides (the key side is detached, as a momentum key would be).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptsoup.ssl.views import HeadConfig, ProjectedViews, mlp


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss of one direction: CE(q·kᵀ/τ, diagonal) scaled by 2τ."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric MoCo v3 loss: ctr(q1, k2) + ctr(q2, k1)."""
    return infonce(q1, k2, temperature) + infonce(q2, k1, temperature)


class MoCoV3(ProjectedViews):
    """Encoder + projector + predictor; ``forward(views [2, B, C, H, W])`` returns the loss."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, head: HeadConfig | None = None) -> None:
        super().__init__(encoder, "MoCo v3 inter-training", head, projector_last_bn=True)
        self.predictor = mlp(self.head.out, self.head.hidden, self.head.out, last_bn=False)
        self.temperature = temperature

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.ndim != 5 or views.shape[0] != 2:
            raise ValueError("MoCo v3 needs two views: [2, B, C, H, W]")
        b = views.shape[1]
        z = self.project(views)
        q = self.predictor(z)
        k = z.detach()
        return mocov3_loss(q[:b], q[b:], k[:b], k[b:], self.temperature)
