"""k-nearest-neighbour functions of embeddings: the k-NN entropy (Self-Seasoning's loss) and k-NN accuracy.

Pure tensor functions: cosine similarities of L2-normalised rows, the k most similar, a softmax at
temperature T.  The paper's constants are k = 16 and T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptsoup.soup.checks import SoupError

KNN_K = 16
KNN_TEMPERATURE = 0.07


def knn_entropy(z: torch.Tensor, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, center: bool = False) -> torch.Tensor:
    """In-batch k-nearest-neighbour entropy of embeddings ``z`` [B, D] (the Self-Seasoning loss).

    L2-normalise; S = Z Zᵀ with the diagonal at −inf; keep each row's top-k; p = softmax(S_topk / T);
    H = −Σ p log p (p clamped at 1e-12 inside the log); return the batch mean.

    ``center=True`` first subtracts the batch mean of ``z`` (not in the paper's definition).  A ViT's
    pre-logits embeddings share a large constant component (the final LayerNorm's bias), which can put
    every cosine near 1: the top-k similarities then differ by far less than T, H sits at its maximum
    ln k and its gradient vanishes.  Centring removes the shared component and keeps the loss informative.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"knn_entropy needs a batch of at least 2 embeddings, got shape {tuple(z.shape)}")
    top = _top_k_cosines(z, k, center)
    p = torch.softmax(top / temperature, dim=1)
    return -(p * p.clamp(min=1e-12).log()).sum(dim=1).mean()


@torch.no_grad()
def embedding_geometry(z: torch.Tensor, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, center: bool = False) -> dict[str, float]:
    """How informative the kNN-entropy loss can be on embeddings ``z``: the mean pairwise cosine and the mean
    gap between each row's top-1 and top-k neighbour cosines divided by T (near 0: the loss is flat at ln k)."""
    sim = _cosines(z, center)
    off = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    top = _top_k_cosines(z, k, center)
    return {"mean_cosine": float(sim[off].mean()), "topk_gap_over_t": float(((top[:, 0] - top[:, -1]) / temperature).mean())}


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted k-NN classification (cosine similarity, votes weighted by exp(sim / T)); returns labels."""
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    sim = q @ b.T
    k = min(k, b.shape[0])
    top_sim, top_idx = sim.topk(k, dim=1)
    votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32)
    votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
    return votes.argmax(dim=1)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, retrieval: torch.Tensor, evaluation: torch.Tensor,
                 num_classes: int, k: int = KNN_K) -> float:
    """k-NN top-1 (percent) of the ``evaluation`` rows, retrieving among the ``retrieval`` rows."""
    pred = knn_predict(features[evaluation], features[retrieval], labels[retrieval], num_classes, k)
    return float((pred == labels[evaluation]).float().mean() * 100)


def split_retrieval_eval(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint seeded split: ``fraction`` of the rows retrieve, the rest are evaluated."""
    if not 0 < fraction < 1:
        raise SoupError(f"split fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(n - 1, int(round(fraction * n))))
    return perm[:cut].sort().values, perm[cut:].sort().values


def _cosines(z: torch.Tensor, center: bool) -> torch.Tensor:
    """[B, B] cosine similarities of the rows of ``z`` (optionally centred first), in float32."""
    z = z.float()
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    z = F.normalize(z, dim=1)
    return z @ z.T


def _top_k_cosines(z: torch.Tensor, k: int, center: bool) -> torch.Tensor:
    """Each row's k largest cosines to the other rows, in descending order: [B, min(k, B − 1)]."""
    sim = _cosines(z, center)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return sim.masked_fill(eye, float("-inf")).topk(min(k, z.shape[0] - 1), dim=1).values
