"""Seasoning with a few labels: the best of many random coefficient vectors by held-out score.

Candidates are the uniform vector, the M one-hot vectors and ``samples`` draws from Dirichlet(1); the
winner has the best held-out k-NN accuracy on a small labeled set (the classifier's accuracy on request),
so ingredients without a classifier for the task can be seasoned too ("instant seasoning").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from adaptsoup.core.progress import NullProgress
from adaptsoup.soup.registry import MixContext, MixResult, register
from adaptsoup.soup.scoring import Scorer, ScoringOptions, make_scorer
from adaptsoup.soup.stacked import StackedIngredients, open_stack


@dataclass
class SeasonOptions(ScoringOptions):
    samples: int = 1000  # Dirichlet(1) draws besides the uniform and one-hot vectors


def candidate_coefficients(count: int, samples: int, seed: int) -> torch.Tensor:
    """Uniform, the one-hot vectors, then ``samples`` draws from Dirichlet(1): ``[1 + M + samples, M]``."""
    gen = torch.Generator().manual_seed(seed)
    draws = -torch.log(torch.rand(samples, count, generator=gen, dtype=torch.float64).clamp_min(1e-300))
    draws = draws / draws.sum(dim=1, keepdim=True)  # normalised exponentials are Dirichlet(1)
    return torch.cat([torch.full((1, count), 1.0 / count, dtype=torch.float64), torch.eye(count, dtype=torch.float64), draws])


def season(stack: StackedIngredients, scorer: Callable[[StackedIngredients, torch.Tensor], float], samples: int = 1000, seed: int = 0,
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


@register("season", SeasonOptions, needs="labels")
def mix_season(ctx: MixContext, options: SeasonOptions) -> MixResult:
    """Seasoning: the best of Dirichlet(1) samples (+ uniform, one-hots) by held-out k-NN accuracy."""
    model, stack, pre = open_stack(ctx.paths, ctx.device)
    scorer: Scorer = make_scorer(model, ctx.labeled, pre, options, auto="knn")  # works without a task classifier
    progress = ctx.progress or NullProgress()
    task = progress.add_task("season", total=options.samples + 1 + stack.count)
    coefficients, score, tried = season(stack, scorer, options.samples, options.seed, on_step=lambda i, n: progress.update(task, completed=i))
    progress.remove_task(task)
    ctx.log(f"season: best held-out {scorer.kind} accuracy {score:.2f}% among {tried} coefficient vectors")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients,
                     {"heldout_score": score, "scorer": scorer.kind, "candidates": tried})
