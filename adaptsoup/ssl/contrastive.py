"""Self-supervised losses beside MAE for inter-training: MoCo v3 and MMCR.

Both take several augmented views of each image through the encoder's pre-logits features and a small
projection head; the heads are discarded after inter-training (only the encoder goes on to fine-tuning).

* **MoCo v3** (Chen, Xie & He, 2021): 2-layer MLP projector and predictor; symmetric InfoNCE with in-batch
  negatives, ``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k) = CE(q·kᵀ/τ, diag) · 2τ`` as in the reference.
  As in the paper there is no momentum encoder: the online encoder gives both sides (the key side is
  detached, as a momentum key would be).
* **MMCR** (Yerxa et al., 2023): projections L2-normalised; each image's centroid over its views;
  ``loss = λ · mean_b ‖Z_b‖_* − ‖C‖_*`` with ``Z_b`` the [views, D] matrix of image b and ``C`` the
  [B, D] centroid matrix; λ = 0 is "global-only", λ > 0 "global+local".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptsoup.core.models import require_vit

SSL_ALGORITHMS = ("mae", "mocov3", "mmcr")


def mlp(in_dim: int, hidden: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's 2-layer MLP: Linear-BN-ReLU-Linear(-BN without affine)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                               nn.Linear(hidden, out_dim, bias=False)]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


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


@dataclass(frozen=True)
class HeadConfig:
    hidden: int
    out: int

    @classmethod
    def for_encoder(cls, dim: int) -> "HeadConfig":
        """MoCo v3 uses 4096 -> 256 for ViT-B; smaller encoders get proportionally smaller heads."""
        return cls(hidden=min(4096, max(256, 4 * dim)), out=min(256, max(64, dim)))


class ProjectedViews(nn.Module):
    """A ViT ``encoder`` and an MLP ``projector`` on its pre-logits features, shared by MoCo v3 and MMCR."""

    def __init__(self, encoder: nn.Module, purpose: str, head: HeadConfig | None, projector_last_bn: bool) -> None:
        super().__init__()
        self.encoder = require_vit(encoder, purpose)
        self.head = head or HeadConfig.for_encoder(encoder.num_features)
        self.projector = mlp(encoder.num_features, self.head.hidden, self.head.out, last_bn=projector_last_bn)

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the encoder: what is warmed up first and discarded after inter-training."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def project(self, views: torch.Tensor) -> torch.Tensor:
        """``[V, B, C, H, W]`` -> projections ``[V*B, D]`` (view-major)."""
        x = views.flatten(0, 1)
        return self.projector(self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True))


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


class MMCR(ProjectedViews):
    """Encoder + projector; ``forward(views [V, B, C, H, W])`` returns the MMCR loss."""

    def __init__(self, encoder: nn.Module, lam: float = 0.0, head: HeadConfig | None = None) -> None:
        super().__init__(encoder, "MMCR inter-training", head, projector_last_bn=False)
        self.lam = lam

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        v, b = views.shape[:2]
        return mmcr_loss(self.project(views).view(v, b, -1).transpose(0, 1), self.lam)


def multiview_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Loss function for :func:`adaptsoup.train.loop.train` with ``views > 1`` (x is [V, B, C, H, W])."""
    return module(x)
