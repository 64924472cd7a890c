"""Gradient caching: a batch loss that couples its images only through their embeddings, with the memory of one chunk.

Self-Seasoning's loss L(Z) sees the B images of a batch only through their B×D embeddings Z = f(θ(α), X).
Its gradient in the mixture logits ℓ is therefore a sum over chunks of the batch,

    dL/dℓ = Σ_c (∂Z_c/∂ℓ)ᵀ · dL/dZ_c,

so it can be computed in three passes whose activation memory is one chunk's, whatever B (the trick of
Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. Z, chunk by chunk, without an autograd graph;
2. G = dL/dZ (B×D: cheap, the loss itself is differentiated as usual);
3. each chunk again, now with a graph, back-propagating its rows of G into the mixed parameters θ(α);
   their accumulated gradients then go once through the mixing into ℓ.

The price is one extra forward pass (about a third more compute than plain back-propagation).  The result
is the plain gradient up to float summation order; ``tests/test_mixing.py`` checks it against the direct
computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Params = dict[str, torch.Tensor]
MixParams = Callable[[torch.Tensor], Params]  # mixture logits -> the mixed model's parameters (differentiable)
EmbedChunk = Callable[[Params, torch.Tensor], torch.Tensor]  # (parameters, image indices) -> embeddings [n, D]


@dataclass(frozen=True)
class ChunkedEmbedding:
    """How to embed the images ``idx`` under mixture logits: mix the parameters once, then embed ``chunk`` images at a time."""

    mix_params: MixParams
    embed_chunk: EmbedChunk
    chunk: int

    def chunks(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(idx, max(1, self.chunk)))


def cached_embeddings(logits: torch.Tensor, idx: torch.Tensor, how: ChunkedEmbedding) -> torch.Tensor:
    """The embeddings [len(idx), D] of images ``idx``, differentiable in ``logits`` through gradient caching.

    Forward holds no graph; backward re-runs one chunk at a time.  When ``idx`` fits in one chunk this is
    plain back-propagation (no extra forward pass).
    """
    if len(idx) <= how.chunk:
        return how.embed_chunk(how.mix_params(logits), idx)
    return _CachedEmbeddings.apply(logits, idx, how)


class _CachedEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor, how: ChunkedEmbedding) -> torch.Tensor:  # noqa: D102
        with torch.no_grad():
            params = how.mix_params(logits)
            z = torch.cat([how.embed_chunk(params, part) for part in how.chunks(idx)])
        ctx.save_for_backward(logits, idx)
        ctx.how = how
        return z

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):  # noqa: D102
        logits, idx = ctx.saved_tensors
        how: ChunkedEmbedding = ctx.how
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            mixed = how.mix_params(leaf)
            cut = {k: v.detach().requires_grad_(True) for k, v in mixed.items() if v.requires_grad}
            for v in cut.values():  # allocated before the chunks' activations come and go (no fragmentation)
                v.grad = torch.zeros_like(v)
            params = {**mixed, **cut}
            start = 0
            for part in how.chunks(idx):
                z = how.embed_chunk(params, part)
                z.backward(grad_z[start : start + len(part)].to(z.dtype))
                start += len(part)
            used = list(cut)
            (grad_logits,) = torch.autograd.grad([mixed[k] for k in used], leaf, [cut[k].grad for k in used])
        return grad_logits, None, None
