"""Seasoning: choosing mixture coefficients from data.

* **Self-Seasoning** (no labels, Self-Soupervision §3.3): learn M mixture logits so that the mixed model's
  embeddings of target images have confident in-batch nearest neighbours — minimise the entropy of the
  softmax over each sample's top-k cosine similarities (k = 16, T = 0.07).
* **Seasoning** (few labels): sample coefficient vectors from Dirichlet(1) (plus uniform and one-hot) and
  keep the one with the best k-NN accuracy on a small labeled set split into retrieval and evaluation
  parts; works for ingredients without a classifier for the task ("instant seasoning").
* **Greedy soup** (Wortsman et al., 2022) and the **best single ingredient**, scored on held-out labels.

These need the M ingredients in memory at once: :class:`StackedIngredients` holds them once, stacked
per tensor, and mixes by a single weighted sum per tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adaptsoup.core.checkpoint import read_checkpoint
from adaptsoup.core.data import ImageSet, Preprocess, eval_batches
from adaptsoup.soup.mixing import SoupError, check_compatible

KNN_K = 16
KNN_TEMPERATURE = 0.07


# --------------------------------------------------------------------------------------------------------------
# Losses and scores on embeddings


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
    z = z.float()
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    z = F.normalize(z, dim=1)
    sim = z @ z.T
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    top = sim.topk(min(k, z.shape[0] - 1), dim=1).values
    p = torch.softmax(top / temperature, dim=1)
    return -(p * p.clamp(min=1e-12).log()).sum(dim=1).mean()


@torch.no_grad()
def embedding_geometry(z: torch.Tensor, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, center: bool = False) -> dict[str, float]:
    """How informative the kNN-entropy loss can be on embeddings ``z``: the mean pairwise cosine and the mean
    gap between each row's top-1 and top-k neighbour cosines divided by T (near 0: the loss is flat at ln k)."""
    z = z.float()
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    z = F.normalize(z, dim=1)
    sim = z @ z.T
    off = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    top = sim.masked_fill(~off, float("-inf")).topk(min(k, z.shape[0] - 1), dim=1).values
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


# --------------------------------------------------------------------------------------------------------------
# M ingredients in memory, mixed by coefficients


class PreLogits(nn.Module):
    """``model`` up to its pre-logits features (timm's ``forward_head(pre_logits=True)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class StackedIngredients:
    """The float tensors of M ingredients stacked once as ``[M, *shape]``; ``mix(α)`` gives Σ α_i θ_i."""

    def __init__(self, paths: Sequence[str | os.PathLike], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if not paths:
            raise SoupError("no ingredients to mix")
        stacked: dict[str, list[torch.Tensor]] = {}
        self.constants: dict[str, torch.Tensor] = {}
        first = None
        for path in paths:
            state, _ = read_checkpoint(path)
            if first is None:
                first = state
            else:
                check_compatible(first, state, Path(path).name, Path(paths[0]).name)
            for key, value in state.items():
                if value.is_floating_point():
                    stacked.setdefault(key, []).append(value.to(dtype))
                elif key not in self.constants:
                    self.constants[key] = value.clone()
        self.device = torch.device(device)
        self.stacked = {k: torch.stack(v).to(self.device) for k, v in stacked.items()}
        self.constants = {k: v.to(self.device) for k, v in self.constants.items()}
        self.count = len(paths)

    def mix(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(α) = Σ_i α_i θ_i for every float tensor (differentiable in α); constants as they are."""
        alpha = alpha.to(device=self.device, dtype=next(iter(self.stacked.values())).dtype)
        out = {k: torch.tensordot(alpha, v, dims=1) for k, v in self.stacked.items()}
        out.update(self.constants)
        return out

    def state_dict(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """A detached float64-accumulated mix on the CPU, in the ingredients' dtype (for writing the soup)."""
        a = alpha.detach().to("cpu", torch.float64)
        out = {k: torch.tensordot(a, v.to("cpu", torch.float64), dims=1).to(v.dtype) for k, v in self.stacked.items()}
        out.update({k: v.to("cpu", copy=True) for k, v in self.constants.items()})
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.stacked.values())


@torch.no_grad()
def mixed_features(model: nn.Module, stack: StackedIngredients, alpha: torch.Tensor, images: ImageSet, pre: Preprocess,
                   batch_size: int = 256, want: str = "features") -> torch.Tensor:
    """Pre-logits features (or logits) of the mixed model θ(α) on every image."""
    params = stack.mix(alpha)
    module = (PreLogits(model) if want == "features" else model).to(stack.device)
    prefix = "model." if want == "features" else ""
    params = {prefix + k: v for k, v in params.items()}
    outs = [functional_call(module, params, (x.to(stack.device),)).float().cpu() for x, _ in eval_batches(images, pre, batch_size)]
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------------------------
# Self-Seasoning


@dataclass
class SelfSeasonConfig:
    epochs: int = 100
    subset: int = 0  # 0: all target images; else a seeded random subset of this size
    batch_size: int = 256
    lr: float = 0.1
    min_lr: float = 0.01
    weight_decay: float = 0.0
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE
    center: bool = False  # subtract the batch mean of the embeddings first (see knn_entropy)
    seed: int = 0
    bf16: bool = False


@dataclass
class SelfSeasonResult:
    coefficients: list[float]
    logits: list[float]
    losses: list[float]  # mean loss per epoch
    initial_loss: float
    steps: int
    geometry: dict[str, float] = field(default_factory=dict)  # of the first batch's embeddings, before any step


def self_season(model: nn.Module, stack: StackedIngredients, target: ImageSet, pre: Preprocess, cfg: SelfSeasonConfig,
                on_step: Callable[[int, int, float], None] | None = None) -> SelfSeasonResult:
    """Learn mixture coefficients α = softmax(ℓ), ℓ ∈ R^M from 0, by AdamW on the kNN-entropy loss of θ(α)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(target)
    if cfg.subset and cfg.subset < n:
        target = target.subset(torch.randperm(n, generator=gen)[: cfg.subset].sort().values)
        n = len(target)
    if n < 2:
        raise SoupError("self-seasoning needs at least 2 target images")
    batch = min(cfg.batch_size, n)
    per_epoch = max(1, n // batch)
    total = cfg.epochs * per_epoch
    logits = torch.zeros(stack.count, device=stack.device, requires_grad=True)
    opt = torch.optim.AdamW([logits], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=cfg.min_lr)
    module = PreLogits(model).eval().to(stack.device)
    for p in module.parameters():
        p.requires_grad_(False)

    def embed(x: torch.Tensor) -> torch.Tensor:
        """The mixed model θ(softmax(ℓ))'s pre-logits embeddings of ``x`` (differentiable in ℓ)."""
        params = {"model." + k: v for k, v in stack.mix(torch.softmax(logits, dim=0)).items()}
        with torch.autocast(stack.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            return functional_call(module, params, (x.to(stack.device, non_blocking=True),)).float()

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        return knn_entropy(embed(x), cfg.k, cfg.temperature, cfg.center)

    with torch.no_grad():  # the starting point, on a seeded random batch (the target is stored in folder order)
        probe = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:batch]
        z = embed(pre.normalize(target.images[probe]))
        initial = float(knn_entropy(z, cfg.k, cfg.temperature, cfg.center))
        geometry = embedding_geometry(z, cfg.k, cfg.temperature, cfg.center)
    losses, step = [], 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        epoch_losses = []
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            loss = loss_on(pre.normalize(target.images[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_losses.append(loss.detach().item())
            step += 1
            if on_step is not None:
                on_step(step, total, epoch_losses[-1])
        losses.append(sum(epoch_losses) / len(epoch_losses))
    alpha = torch.softmax(logits.detach().cpu(), dim=0)
    return SelfSeasonResult(alpha.tolist(), logits.detach().cpu().tolist(), losses, initial, step, geometry)


# --------------------------------------------------------------------------------------------------------------
# Seasoning with a few labels, greedy soup, best ingredient


def candidate_coefficients(count: int, samples: int, seed: int) -> torch.Tensor:
    """Uniform, the one-hot vectors, then ``samples`` draws from Dirichlet(1): ``[1 + M + samples, M]``."""
    gen = torch.Generator().manual_seed(seed)
    draws = -torch.log(torch.rand(samples, count, generator=gen, dtype=torch.float64).clamp_min(1e-300))
    draws = draws / draws.sum(dim=1, keepdim=True)  # normalised exponentials are Dirichlet(1)
    return torch.cat([torch.full((1, count), 1.0 / count, dtype=torch.float64), torch.eye(count, dtype=torch.float64), draws])


@dataclass
class Scorer:
    """Held-out accuracy of a mixed model: its classifier on all labeled images, or k-NN on a split."""

    model: nn.Module
    labeled: ImageSet
    pre: Preprocess
    use_classifier: bool
    k: int = KNN_K
    split: float = 0.5
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        self.retrieval, self.evaluation = split_retrieval_eval(len(self.labeled), self.split, self.seed)
        self.num_classes = int(self.labeled.labels.max()) + 1 if not self.labeled.class_names else len(self.labeled.class_names)

    @property
    def kind(self) -> str:
        return "classifier" if self.use_classifier else f"{self.k}-NN"

    def __call__(self, stack: StackedIngredients, alpha: torch.Tensor) -> float:
        if self.use_classifier:
            logits = mixed_features(self.model, stack, alpha, self.labeled, self.pre, self.batch_size, want="logits")
            return float((logits.argmax(1) == self.labeled.labels).float().mean() * 100)
        feats = mixed_features(self.model, stack, alpha, self.labeled, self.pre, self.batch_size)
        return knn_accuracy(feats, self.labeled.labels, self.retrieval, self.evaluation, self.num_classes, self.k)


def season(stack: StackedIngredients, scorer: Scorer, samples: int = 1000, seed: int = 0,
           on_step: Callable[[int, int], None] | None = None) -> tuple[list[float], float, int]:
    """Best of the candidate coefficient vectors by held-out score: (coefficients, score, candidates tried)."""
    candidates = candidate_coefficients(stack.count, samples, seed)
    best, best_score = candidates[0], -math.inf
    for i, alpha in enumerate(candidates):
        score = scorer(stack, alpha)
        if score > best_score:
            best, best_score = alpha, score
        if on_step is not None:
            on_step(i + 1, len(candidates))
    return best.tolist(), best_score, len(candidates)


def score_each(stack: StackedIngredients, scorer: Scorer) -> list[float]:
    return [scorer(stack, torch.eye(stack.count, dtype=torch.float64)[i]) for i in range(stack.count)]


def greedy(stack: StackedIngredients, scorer: Scorer, tie: str = "strict") -> tuple[list[float], list[int], list[float], list[dict]]:
    """Greedy soup: add ingredients in order of their own score while the soup's held-out score rises.

    ``tie="keep"`` also accepts an ingredient that leaves the score unchanged.  Returns (coefficients,
    chosen indices, individual scores, the decision trail).
    """
    if tie not in ("strict", "keep"):
        raise SoupError(f"greedy tie rule must be 'strict' or 'keep', got {tie!r}")
    individual = score_each(stack, scorer)
    order = sorted(range(stack.count), key=lambda i: -individual[i])
    chosen, best = [order[0]], individual[order[0]]
    trail = [{"ingredient": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        alpha = torch.zeros(stack.count, dtype=torch.float64)
        alpha[chosen + [i]] = 1.0 / (len(chosen) + 1)
        score = scorer(stack, alpha)
        keep = score > best or (tie == "keep" and score == best)
        trail.append({"ingredient": i, "score": score, "kept": keep})
        if keep:
            chosen.append(i)
            best = score
    alpha = torch.zeros(stack.count, dtype=torch.float64)
    alpha[chosen] = 1.0 / len(chosen)
    return alpha.tolist(), chosen, individual, trail
