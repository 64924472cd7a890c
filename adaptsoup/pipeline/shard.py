"""The ingredient grid split across independent jobs (``adapt --shard I/N``) that share one run directory.

The unit of work is an inter-training run with its N fine-tunings back (they share the encoder), or one
vanilla ingredient; units are dealt round-robin to the N shards in plan order.  Before a job trains a unit
it claims it (:mod:`~adaptsoup.pipeline.claims`), so no two live jobs ever share one, and a dead job's unit
is taken over and resumed from its state file.  The job that finds every ingredient made writes the soups
and the evaluation, once (the ``finish`` claim, marked done when written); ``adapt --resume RUN`` may
always write them again (to mix or adapt a finished run differently).
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.plan import Ingredient, InterRun, Plan

UNSHARDED = "all"


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (1-based) of ``count`` parts of the grid."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise AdaptsoupError(f"--shard takes I/N (this job's part and the number of parts), got {text!r}") from None
        if not 1 <= index <= count:
            raise AdaptsoupError(f"--shard {text}: I must be between 1 and N")
        return cls(index, count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def unit_owner(plan: Plan, count: int) -> dict[str, int]:
    """Training run or ingredient name -> the shard (1-based) that makes it."""
    owner: dict[str, int] = {}
    for k, inter in enumerate(plan.inters):
        owner[inter.name] = k % count + 1
        for ing in plan.ingredients_of(inter):
            owner[ing.name] = owner[inter.name]
    for v, ing in enumerate(plan.of_kind("vanilla")):
        owner[ing.name] = (len(plan.inters) + v) % count + 1
    return owner


def owns(shard: Shard | None, plan: Plan, item: InterRun | Ingredient) -> bool:
    """Whether this job makes ``item`` (every item, without ``--shard``)."""
    return shard is None or unit_owner(plan, shard.count)[item.name] == shard.index
