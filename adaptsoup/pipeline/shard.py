"""The ingredient grid split across independent jobs (``adapt --shard I/N``) that share one run directory.

The unit of work is an inter-training run with its N fine-tunings back (they share the encoder), or one
vanilla ingredient; units are dealt round-robin to the N shards in plan order.  Before a job trains a run
or an ingredient it *claims* it: ``claims/<name>.json`` created with ``O_EXCL``, which exactly one job can
do.  A claim held by the same shard label was left by an earlier job of that shard that died (a rerun of
an array task): it is taken over and the training resumes from its state file.  A claim by another shard
is that shard's to finish.  The job that finds every ingredient made writes the soups and the evaluation,
once (the ``finish`` claim); ``adapt --resume RUN`` always may.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from adaptsoup.core.io import write_json_atomic
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.plan import Ingredient, InterRun, Plan

UNSHARDED = "all"
FINISH = "finish"


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


def claim_path(root: Path, name: str) -> Path:
    return Path(root) / "claims" / f"{name}.json"


def claim(root: Path, name: str, label: str) -> str:
    """Claim ``name`` for the job labelled ``label``: "new", "taken over" (an earlier job of this label
    died holding it) or "other" (another label holds it; nothing is changed)."""
    path = claim_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"owner": label, "host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "job": os.environ.get("SLURM_JOB_ID")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        held = read_claim(path)
        if held.get("owner") != label:
            return "other"
        write_json_atomic(path, record)
        return "taken over"
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return "new"


def read_claim(path: Path) -> dict:
    """A claim's record ({} while its creator is still writing it, or if it is unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def release(root: Path, name: str) -> None:
    """Drop the claim on ``name`` once what it names is written."""
    claim_path(root, name).unlink(missing_ok=True)


def describe(root: Path, name: str) -> str:
    held = read_claim(claim_path(root, name))
    return (f"claimed by shard {held.get('owner', '?')} (host {held.get('host', '?')}, pid {held.get('pid', '?')}, "
            f"since {held.get('since', '?')})")
