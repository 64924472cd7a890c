"""MMCR, Maximum Manifold Capacity Representations (Yerxa et al., 2023), for inter-training.

Projections are L2-normalised; each image's centroid is taken over its views;
``loss = λ · mean_b ‖Z_b‖_* − ‖C‖_*`` with ``Z_b`` the [views, D] matrix of image b and ``C`` the [B, D]
centroid matrix; λ = 0 is "global-only", λ > 0 "global+local".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptsoup.ssl.views import HeadConfig, ProjectedViews


def nuclear_norm(x: torch.Tensor) -> torch.Tensor:
    """Sum of singular values of the last two dimensions (batched)."""
    return torch.linalg.svdvals(x.float()).sum(dim=-1)


def mmcr_loss(z: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """MMCR on projections ``z`` [B, views, D]: λ·mean_b ‖Z_b‖_* − ‖centroids‖_*."""
    if z.ndim != 3:
        raise ValueError(f"mmcr_loss needs [batch, views, dim], got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=-1)
    centroids = z.mean(dim=1)
    loss = -nuclear_norm(centroids)
    if lam:
        loss = loss + lam * nuclear_norm(z).mean()
    return loss


class MMCR(ProjectedViews):
    """Encoder + projector; ``forward(views [V, B, C, H, W])`` returns the MMCR loss."""

    def __init__(self, encoder: nn.Module, lam: float = 0.0, head: HeadConfig | None = None) -> None:
        super().__init__(encoder, "MMCR inter-training", head, projector_last_bn=False)
        self.lam = lam

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        v, b = views.shape[:2]
        return mmcr_loss(self.project(views).view(v, b, -1).transpose(0, 1), self.lam)
