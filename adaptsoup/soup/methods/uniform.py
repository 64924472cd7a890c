"""The uniform soup (Wortsman et al., 2022): the plain average of all ingredients, streamed."""

from __future__ import annotations

from dataclasses import dataclass

from adaptsoup.soup.average import stream_weighted_average
from adaptsoup.soup.registry import MixContext, MixResult, register


@dataclass
class UniformOptions:
    """The uniform soup has no options."""


@register("uniform", UniformOptions)
def mix_uniform(ctx: MixContext, options: UniformOptions) -> MixResult:
    """The uniform soup: the plain average of all ingredients, streamed one file at a time."""
    state, _meta = stream_weighted_average(ctx.paths)
    n = len(ctx.paths)
    return MixResult(state_dict=state, coefficients=[1.0 / n] * n, info={})
