"""What every stage of an ``adapt`` run reads and writes: the resolved recipe, the run directory with its
manifest and log, the deployed model and the loaded images.  :func:`open_run` builds it; each stage
(:mod:`~adaptsoup.pipeline.inter_train`, :mod:`~adaptsoup.pipeline.finetune_back`, ...) is a function of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import MutableMapping
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from torch import nn

from adaptsoup.core import distributed
from adaptsoup.core.data import Preprocess
from adaptsoup.core.distributed import World
from adaptsoup.core.manifest import Manifest, environment
from adaptsoup.core.models import class_names, load_model, model_meta, require_vit
from adaptsoup.core.progress import NullProgress
from adaptsoup.core.run_dir import RunDir, RunLog
from adaptsoup.pipeline.diversity import add_parameter_noise, name_seed, tensor_stds
from adaptsoup.pipeline.inputs import RunInputs, load_inputs
from adaptsoup.pipeline.recipe import AdaptConfig, validate
from adaptsoup.pipeline.claims import DONE, OTHER, TAKEN_OVER, Claims
from adaptsoup.pipeline.shard import UNSHARDED, Shard
from adaptsoup.pipeline.start import protocol


CLAIM_POLL_S = 2.0  # how often a job waiting for a unit another job is making looks again


@dataclass
class RunContext:
    cfg: AdaptConfig
    run_dir: RunDir
    manifest: Manifest
    log: RunLog
    deployed: nn.Module  # the stock: preprocessing, class names, noise scale and soup metadata come from it
    inputs: RunInputs
    progress: object = field(default_factory=NullProgress)
    on_step: Callable[[str, int], None] | None = None  # (training run name, step): a test's crash hook
    started: float = field(default_factory=time.perf_counter)
    world: World = field(default_factory=World)  # this process among torchrun's data-parallel ranks
    shard: Shard | None = None  # this job's part of the grid (``--shard``); None: all of it

    claims: Claims | None = None  # this job's claims on units of the run directory (made by ``__post_init__``)
    left_to_others: list[str] = field(default_factory=list)  # units a live job held when this one came to them

    def __post_init__(self) -> None:
        if self.claims is None:
            self.claims = Claims(self.run_dir.root, self.job_label)

    @property
    def job_label(self) -> str:
        return self.shard.label if self.shard else UNSHARDED

    @property
    def waits(self) -> bool:
        """Whether a unit held by a live job is waited for (a shard: its units are its own, and a requeued task
        resumes one whose old job dies) rather than left to that job (``adapt --resume`` by hand: jobs split the grid)."""
        return self.shard is not None

    def on_main(self, decide: Callable[[], object]):
        """``decide()`` on rank 0, its answer on every rank: decisions that read the run directory are made once."""
        return distributed.from_main(decide() if self.world.is_main else None)

    def claim(self, name: str, done: Callable[[], bool] | None = None, *, wait: bool | None = None) -> bool:
        """Whether this job makes the unit ``name`` (:mod:`~adaptsoup.pipeline.claims`): False when ``done()``
        (checked before and after the claim is won) or when a live job holds it; with ``wait`` (default: this
        job's :attr:`waits`), wait for that job instead and then decide again.  Rank 0 decides, every rank
        learns its answer."""
        return self.on_main(lambda: self._claim(name, done, self.waits if wait is None else wait))

    def _claim(self, name: str, done: Callable[[], bool] | None, wait: bool) -> bool:
        waited = False
        while True:
            outcome = self.claims.claim(name, done)
            if outcome == DONE:
                return False
            if outcome == TAKEN_OVER:
                self.log(f"{name}: taking over the claim of a job that is gone (it resumes from its state file)")
            if outcome != OTHER:
                return True
            if not wait:
                self.log(f"{name}: {self.claims.describe(name)}; left to that job")
                self.left_to_others.append(name)
                return False
            if not waited:
                self.log(f"{name}: {self.claims.describe(name)}; waiting for it")
                waited = True
            time.sleep(CLAIM_POLL_S)

    def written(self, name: str) -> None:
        """``name`` is on disk: drop its claim (rank 0), and let every rank go on once it is (a barrier)."""
        if self.world.is_main:
            self.claims.release(name)
        distributed.barrier()

    def close(self) -> None:
        """The job has ended (finished or not): what it still claims may be taken over by the next job."""
        self.claims.close()

    def step_hook(self, name: str) -> Callable[[int, float], None] | None:
        """``train``'s ``on_step`` for the training run ``name``."""
        if self.on_step is None:
            return None
        return lambda step, loss: self.on_step(name, step)

    @contextlib.contextmanager
    def timed(self, key: str, *, accumulate: bool = False) -> Iterator[None]:
        """Record the block's wall time as ``timings_s[key]`` (added to earlier sittings' with ``accumulate``)."""
        t0 = time.perf_counter()
        yield
        timings = self.manifest.data.setdefault("timings_s", {})
        timings[key] = (timings.get(key, 0) if accumulate else 0) + time.perf_counter() - t0
        self.manifest.save()

    def elapsed(self) -> float:
        """Seconds since this invocation opened the run."""
        return time.perf_counter() - self.started

    @property
    def precision_memo(self) -> "PrecisionMemo":
        """What ``precision = auto`` chose for each kind of training run, kept in the manifest (see ``train``)."""
        return PrecisionMemo(self.manifest, self.log)

    def reload_manifest(self) -> None:
        """Read the manifest again after a library call that wrote it itself (``mix_run``)."""
        self.manifest = open_manifest(self.run_dir, self.world, self.shard)

    @functools.cached_property
    def _noise_stds(self) -> dict[str, float]:
        return tensor_stds(self.deployed.state_dict())

    def add_noise(self, model: nn.Module, multiplier: float, name: str) -> None:
        """Parameter noise of ``multiplier`` x the stock's per-tensor std, seeded by ``name`` (nothing at 0)."""
        if multiplier:
            model.load_state_dict(add_parameter_noise(model.state_dict(), multiplier, self._noise_stds, name_seed(name, self.cfg.seed)))


class PrecisionMemo(MutableMapping):
    """The manifest's ``precision_probes`` section as a mapping; each new entry is saved at once and logged."""

    def __init__(self, manifest: Manifest, log: Callable[[str], None]) -> None:
        self.manifest = manifest
        self.log = log

    def _section(self) -> dict[str, str]:
        return self.manifest.data.setdefault("precision_probes", {})

    def __getitem__(self, key: str) -> str:
        return self._section()[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.manifest.update("precision_probes", key, value)
        self.log(f"precision auto: {value} for {key} (the fastest train step measured here; its timings are in the manifest)")

    def __delitem__(self, key: str) -> None:
        del self._section()[key]
        self.manifest.save()

    def __iter__(self):
        return iter(dict(self._section()))

    def __len__(self) -> int:
        return len(self._section())


def open_manifest(run_dir: RunDir, world: World, shard: Shard | None) -> Manifest:
    """The run's manifest: written by rank 0 only; saved merged under a lock when shards share it."""
    manifest = Manifest.load_or_new(run_dir.manifest, kind="adapt")
    manifest.writable, manifest.shared = world.is_main, True  # jobs may share a run directory, sharded or not
    return manifest


def record_command(manifest: Manifest, command: str, cfg: AdaptConfig, shard: Shard | None) -> None:
    """The recipe and environment of this invocation; the first command and working folder stay recorded, and
    every command that touched the run is added to ``commands`` (shards record theirs under ``shards``)."""
    manifest.data.update(config=cfg.to_dict(), environment=environment())
    manifest.data.setdefault("command", command)
    manifest.data.setdefault("cwd", os.getcwd())
    if shard is None:
        manifest.data.setdefault("commands", []).append(
            {"command": command, "cwd": os.getcwd(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def open_run(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
             on_step: Callable[[str, int], None] | None = None, shard: Shard | None = None) -> RunContext:
    """Check the recipe, join torchrun's process group if there is one, create (or reopen) the run
    directory, record the invocation, load the deployed model and decode the images.  Ranks other than 0
    log and draw nothing, and read the decoded images from the cache rank 0 wrote."""
    validate(cfg)
    started = time.perf_counter()
    world = distributed.init_distributed(cfg.device)
    progress = progress if (progress is not None and world.is_main) else NullProgress()
    run_dir = RunDir(Path(cfg.out)).create()
    log = RunLog(run_dir.log if world.is_main else None, echo if world.is_main else None)
    manifest = open_manifest(run_dir, world, shard)
    command = command or " ".join(sys.argv)
    record_command(manifest, command, cfg, shard)
    if world.distributed:
        manifest.data["world_size"] = world.size
    if shard is not None:
        manifest.data["shards"] = {shard.label: {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    manifest.data.setdefault("timings_s", {})
    manifest.data.setdefault("ingredients", {})
    manifest.save()
    deployed = require_vit(load_model(cfg.arch, cfg.model), "adapt")
    t0 = time.perf_counter()
    with distributed.main_then_barrier() as main:
        if main:
            inputs = load_inputs(cfg, Preprocess.for_model(deployed), class_names(deployed), progress)
    if not world.is_main:
        inputs = load_inputs(cfg, Preprocess.for_model(deployed), class_names(deployed), progress)
    manifest.data["data"] = inputs.records()
    manifest.data["timings_s"]["load_data"] = time.perf_counter() - t0
    manifest.save()
    ctx = RunContext(cfg, run_dir, manifest, log, deployed, inputs, progress=progress, on_step=on_step, started=started,
                     world=world, shard=shard)
    for line in ctx.inputs.skipped_lines():
        log(line)
    source = ctx.inputs.source
    manifest.data["protocol"] = protocol(cfg)
    manifest.save()
    log(f"protocol {protocol(cfg)}: inter-training and vanilla fine-tuning start from "
        + (f"the pre-trained encoder {cfg.pretrained}" if cfg.pretrained else f"the deployed model {cfg.model}"))
    log(f"stock {cfg.model}: {model_meta(deployed).arch}, {deployed.num_classes} classes; target {len(ctx.inputs.target)} images"
        + (f", source {len(source)} labeled" if source is not None else ", no source (label-free ingredients)"))
    return ctx
