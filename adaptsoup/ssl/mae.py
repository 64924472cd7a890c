"""Masked autoencoding (He et al., 2022) around any timm VisionTransformer.

The wrapper reuses the ViT's own modules (``patch_embed``, class/register tokens, ``pos_embed``, ``blocks``,
``norm``), runs the encoder on the visible patches only and adds a light decoder that predicts the pixels
of the masked patches.  The decoder's key names are those of the original MAE code (``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``), so an MAE
pre-trained checkpoint's decoder loads as is; the encoder keeps timm's key names, so after training
``wrapper.encoder`` is a plain timm model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from adaptsoup.errors import CheckpointError
from adaptsoup.core.models import MAE_DECODER_PREFIXES, require_vit


@dataclass(frozen=True)
class DecoderConfig:
    dim: int
    depth: int
    num_heads: int

    @classmethod
    def for_encoder(cls, embed_dim: int) -> "DecoderConfig":
        """MAE's 8 x 512 decoder for ViT-B and larger; proportionally lighter for small encoders."""
        if embed_dim >= 768:
            return cls(dim=512, depth=8, num_heads=16)
        if embed_dim >= 384:
            return cls(dim=256, depth=4, num_heads=8)
        if embed_dim >= 192:
            return cls(dim=128, depth=2, num_heads=4)
        dim = max(32, embed_dim)
        return cls(dim=dim, depth=1, num_heads=max(1, dim // 32))


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[1, num_prefix + H*W, dim]`` (prefix positions are zero), as MAE."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's layout: the first half of the channels encodes the column (x) index, the second half the row (y).
    emb = np.concatenate([encode(xs), encode(ys)], axis=1)
    emb = np.concatenate([np.zeros((num_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """``encoder`` (a timm ViT) + an MAE decoder.  ``forward(images)`` returns (loss, pred, mask)."""

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: DecoderConfig | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = require_vit(encoder, "MAE inter-training")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        embed_dim = encoder.embed_dim
        cfg = decoder or DecoderConfig.for_encoder(embed_dim)
        self.decoder_config = cfg
        self.patch_size = tuple(encoder.patch_embed.patch_size)
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.in_chans = encoder.patch_embed.proj.in_channels if hasattr(encoder.patch_embed, "proj") else 3
        self.num_prefix = int(encoder.num_prefix_tokens)
        # (start, stop, global batch) under data-parallel training: the masks are drawn for the whole global
        # batch, as one process would, and this rank keeps its slice (set by the training loop).
        self.batch_share: tuple[int, int, int] | None = None

        self.decoder_embed = nn.Linear(embed_dim, cfg.dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(cfg.dim, self.grid, self.num_prefix), requires_grad=False
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [Block(cfg.dim, cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(cfg.depth)]
        )
        self.decoder_norm = norm_layer(cfg.dim)
        self.decoder_pred = nn.Linear(cfg.dim, self.patch_size[0] * self.patch_size[1] * self.in_chans, bias=True)
        self._init_decoder()

    # -- parameters ----------------------------------------------------------------------------------------------

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks, self.decoder_norm]:
            module.apply(_init_weights)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad]

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Decoder tensors under the original MAE key names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(MAE_DECODER_PREFIXES)}

    def load_decoder_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load decoder keys (original MAE names) from a checkpoint; other keys are ignored."""
        decoder = {k: v for k, v in state_dict.items() if k.startswith(MAE_DECODER_PREFIXES)}
        own = self.decoder_state_dict()
        if not decoder:
            raise CheckpointError("the checkpoint holds no MAE decoder keys (decoder_embed, decoder_blocks, ...)")
        # The fixed sin-cos table is recomputed for this grid; a checkpoint's copy is only used if it fits.
        if "decoder_pos_embed" in decoder and decoder["decoder_pos_embed"].shape != own["decoder_pos_embed"].shape:
            decoder.pop("decoder_pos_embed")
        decoder.setdefault("decoder_pos_embed", own["decoder_pos_embed"])
        missing = sorted(set(own) - set(decoder))
        misshaped = [f"{k} {tuple(decoder[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in decoder and decoder[k].shape != v.shape]
        if missing or misshaped:
            raise CheckpointError(
                "MAE decoder does not fit: "
                + "; ".join(x for x in (f"missing {', '.join(missing[:4])}" if missing else "", f"mis-shaped {', '.join(misshaped[:4])}" if misshaped else "") if x)
            )
        self.load_state_dict({**self.state_dict(), **{k: decoder[k] for k in own}}, strict=True)

    # -- forward -------------------------------------------------------------------------------------------------

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, L, p*q*C]`` in MAE's (h, w, p, q, c) order."""
        b, c, h, w = images.shape
        p, q = self.patch_size
        gh, gw = h // p, w // q
        x = images.reshape(b, c, gh, p, gw, q)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, p * q * c)

    def random_masking(self, num_patches: int, batch: int, device: torch.device, generator: torch.Generator | None = None):
        """Per-sample random masking by argsort of uniform noise: (ids_keep, mask, ids_restore)."""
        len_keep = max(1, int(num_patches * (1 - self.mask_ratio)))
        if self.batch_share is not None and self.batch_share[1] - self.batch_share[0] == batch:
            start, stop, total = self.batch_share
            noise = torch.rand(total, num_patches, device=device, generator=generator)[start:stop]
        else:
            noise = torch.rand(batch, num_patches, device=device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch, num_patches, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # 1 = masked (predicted), 0 = visible
        return ids_keep, mask, ids_restore

    def forward_encoder(self, images: torch.Tensor, generator: torch.Generator | None = None):
        vit = self.encoder
        x = vit.patch_embed(images)
        if x.ndim == 4:  # NHWC output
            x = x.flatten(1, 2)
        b, num_patches, dim = x.shape
        if vit.no_embed_class:
            pos_patch, pos_prefix = vit.pos_embed, None
        else:
            pos_patch, pos_prefix = vit.pos_embed[:, self.num_prefix :], vit.pos_embed[:, : self.num_prefix]
        x = x + pos_patch
        ids_keep, mask, ids_restore = self.random_masking(num_patches, b, x.device, generator)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(b, -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if pos_prefix is not None:
                prefix_tokens = prefix_tokens + pos_prefix
            x = torch.cat([prefix_tokens, x], dim=1)
        x = vit.pos_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, _, dim = x.shape
        num_patches = ids_restore.shape[1]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        masked = self.mask_token.expand(b, num_patches - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([prefix, tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, self.num_prefix :]

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches only (per-patch normalised targets if ``norm_pix_loss``)."""
        target = self.patchify(images).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        latent, mask, ids_restore = self.forward_encoder(images, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(images, pred, mask), pred, mask


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
