"""Greedy soup (Wortsman et al., 2022): add ingredients, best first, while the held-out score rises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from adaptsoup.soup.checks import SoupError
from adaptsoup.soup.registry import MixContext, MixResult, register
from adaptsoup.soup.scoring import ScoringOptions, make_scorer, score_each
from adaptsoup.soup.stacked import StackedIngredients, open_stack


@dataclass
class GreedyOptions(ScoringOptions):
    tie: Literal["strict", "keep"] = "strict"  # keep: also accept an ingredient that leaves the score unchanged


def greedy(stack: StackedIngredients, scorer: Callable[[StackedIngredients, torch.Tensor], float],
           tie: str = "strict") -> tuple[list[float], list[int], list[float], list[dict]]:
    """Greedy soup: add ingredients in order of their own score while the soup's held-out score rises.

    Returns (coefficients, chosen indices, individual scores, the decision trail).
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


@register("greedy", GreedyOptions, needs="labels")
def mix_greedy(ctx: MixContext, options: GreedyOptions) -> MixResult:
    """Greedy soup: add ingredients (best first) while held-out accuracy rises."""
    model, stack, pre = open_stack(ctx.paths, ctx.device)
    scorer = make_scorer(model, ctx.labeled, pre, options)
    coefficients, chosen, individual, trail = greedy(stack, scorer, options.tie)
    ctx.log(f"greedy: kept {len(chosen)} of {stack.count} ingredients ({', '.join(ctx.names[i] for i in chosen)})")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients, {
        "scorer": scorer.kind, "chosen": [ctx.names[i] for i in chosen], "individual_scores": individual,
        "trail": [{**t, "ingredient": ctx.names[t["ingredient"]]} for t in trail], "heldout_score": [t["score"] for t in trail if t["kept"]][-1],
    })
