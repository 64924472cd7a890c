"""A copy of a timm ViT whose attention exports in the shape onnxruntime's attention fusion recognises.

timm computes attention from one packed ``qkv`` projection (a MatMul, then a Reshape/Split into q, k, v),
and with ``fused_attn`` it exports ``scaled_dot_product_attention``.  onnxruntime's transformer optimizer
fuses neither: it looks for the BERT layout, three separate projections (MatMul + Add) each reshaped into
heads, ``q @ kᵀ / sqrt(d)``, Softmax, ``@ v``, then the output projection.  :func:`fusable_copy` rewrites each
plain timm ``Attention`` into that layout.  The arithmetic is the same (only the order of the scaling
changes), and the export's parity check compares the file with the original, unmodified model.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class SeparateQKVAttention(nn.Module):
    """timm's multi-head self-attention with separate q, k, v projections and an explicit softmax."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim = int(attn.num_heads), int(attn.head_dim)
        width = self.num_heads * self.head_dim
        weight, bias = attn.qkv.weight.detach(), attn.qkv.bias
        self.query, self.key, self.value = (self._slice(weight, bias, i, width) for i in range(3))
        self.proj = attn.proj

    @staticmethod
    def _slice(weight: torch.Tensor, bias: torch.Tensor | None, index: int, width: int) -> nn.Linear:
        """The ``index``-th third of the packed projection (a zero bias when it has none: the fusion needs the Add)."""
        layer = nn.Linear(weight.shape[1], width, bias=True)
        with torch.no_grad():
            layer.weight.copy_(weight[index * width : (index + 1) * width])
            layer.bias.copy_(bias.detach()[index * width : (index + 1) * width] if bias is not None else torch.zeros(width))
        return layer

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SeparateQKVAttention is for unmasked image models only")
        batch, tokens, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3)
        return self.proj(context.reshape(batch, tokens, self.num_heads * self.head_dim))


def is_plain_attention(module: nn.Module) -> bool:
    """A timm ``Attention`` with nothing the rewrite would drop (no q/k norm, scale norm or gate)."""
    from timm.layers import Attention

    return (
        type(module) is Attention
        and isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)
        and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
        and getattr(module, "gate", None) is None
        and module.attn_dim == module.num_heads * module.head_dim
    )


def fusable_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of ``model`` with every plain timm attention rewritten; and how many were."""
    clone = copy.deepcopy(model).eval()
    targets = [(name, module) for name, module in clone.named_modules() if is_plain_attention(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, SeparateQKVAttention(module))
    return clone, len(targets)
