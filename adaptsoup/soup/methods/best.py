"""The single best ingredient by held-out accuracy: the baseline every soup must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptsoup.soup.registry import MixContext, MixResult, register
from adaptsoup.soup.scoring import ScoringOptions, make_scorer, score_each
from adaptsoup.soup.stacked import open_stack


@dataclass
class BestOptions(ScoringOptions):
    """How the ingredients are scored (see :class:`~adaptsoup.soup.scoring.ScoringOptions`)."""


@register("best", BestOptions, needs="labels")
def mix_best(ctx: MixContext, options: BestOptions) -> MixResult:
    """The single best ingredient by held-out accuracy: the baseline every soup must beat."""
    model, stack, pre = open_stack(ctx.paths, ctx.device)
    scorer = make_scorer(model, ctx.labeled, pre, options)
    scores = score_each(stack, scorer)
    best = max(range(stack.count), key=lambda i: scores[i])
    coefficients = [1.0 if i == best else 0.0 for i in range(stack.count)]
    ctx.log(f"best: {ctx.names[best]} ({scorer.kind} held-out accuracy {scores[best]:.2f}%)")
    return MixResult(stack.state_dict(torch.tensor(coefficients)), coefficients,
                     {"scorer": scorer.kind, "chosen": ctx.names[best], "individual_scores": scores})
