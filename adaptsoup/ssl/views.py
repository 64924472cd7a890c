"""What MoCo v3 and MMCR share: several augmented views of each image, through the encoder's pre-logits
features and a small MLP projection head.  The heads are discarded after inter-training: only the encoder
goes on to fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaptsoup.core.models import require_vit


def mlp(in_dim: int, hidden: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's 2-layer MLP: Linear-BN-ReLU-Linear(-BN without affine)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                               nn.Linear(hidden, out_dim, bias=False)]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


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
