"""Data-parallel training across processes started by ``torchrun``: who this process is, and the few
collectives the pipeline needs.

``torchrun --nproc-per-node N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed`
joins the process group (gloo on CPU, NCCL on CUDA).  Every rank runs the same training steps on its slice
of each global batch (:func:`rank_slice`); rank 0 alone writes files, and the others wait for it at a
barrier before they read what it wrote.  Without ``torchrun`` the world is one process and every call here
is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from adaptsoup.errors import AdaptsoupError

ENV_TIMEOUT = "ADAPTSOUP_DIST_TIMEOUT_S"  # how long ranks wait for rank 0 (evaluation, mixing) before giving up


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current world: the initialised process group's, or one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def init_distributed(device: str = "cpu") -> World:
    """Join the process group ``torchrun`` describes in the environment (nothing without it); returns the world.

    The backend is NCCL when ``device`` is CUDA, else gloo; each rank uses the GPU of its ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise AdaptsoupError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise AdaptsoupError(f"--device {device} under torchrun, but CUDA is not available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, 4 * 3600)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    return world()


def device_for(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    w = world()
    if w.distributed and torch.device(device).type == "cuda" and torch.device(device).index is None:
        return f"cuda:{w.local_rank}"
    return device


def barrier() -> None:
    """Wait for every rank (nothing in a one-process world)."""
    if world().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_then_barrier() -> Iterator[bool]:
    """Yield whether this is rank 0 (which does the block's work); every rank then meets at a barrier, so
    what rank 0 wrote is complete before anyone reads it."""
    try:
        yield world().is_main
    finally:
        barrier()


def rank_slice(batch: int, w: World | None = None) -> slice:
    """This rank's contiguous part of a global batch of ``batch`` samples (sizes differ by at most one)."""
    w = w or world()
    if batch < w.size:
        raise AdaptsoupError(f"a batch of {batch} cannot be split across {w.size} processes: use a batch size of at least {w.size}")
    base, extra = divmod(batch, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (1 if w.rank < extra else 0))


def from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; the value itself in a one-process world)."""
    if not world().distributed:
        return value
    box = [value if world().is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
