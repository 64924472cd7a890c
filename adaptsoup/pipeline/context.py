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
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.diversity import add_parameter_noise, name_seed, tensor_stds
from adaptsoup.pipeline.inputs import RunInputs, load_inputs
from adaptsoup.pipeline.recipe import AdaptConfig, validate
from adaptsoup.pipeline.shard import UNSHARDED, Shard, claim, describe, release
from adaptsoup.pipeline.start import protocol


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

    @property
    def job_label(self) -> str:
        return self.shard.label if self.shard else UNSHARDED

    def claim(self, name: str) -> bool:
        """Claim the training run ``name`` for this job (:mod:`~adaptsoup.pipeline.shard`); False when
        another shard holds it.  Rank 0 claims, every rank learns its answer."""
        outcome = distributed.from_main(claim(self.run_dir.root, name, self.job_label) if self.world.is_main else None)
        if outcome == "taken over":
            self.log(f"{name}: taking over the claim of an earlier job of "
                     + (f"shard {self.job_label}" if self.shard else "this run") + " (it resumes from its state file)")
        if outcome != "other":
            return True
        held = distributed.from_main(describe(self.run_dir.root, name) if self.world.is_main else None)
        if self.shard is None:
            raise AdaptsoupError(f"{name} is {held}: let that shard finish or rerun it (or delete "
                                 f"{self.run_dir.root / 'claims' / (name + '.json')} if no job will)")
        self.log(f"{name}: {held}; not trained here")
        return False

    def state_name(self, name: str) -> str:
        """The resume file's name of a training run that every shard may do (a decoder warm-up): its own per shard."""
        return f"{name}.shard{self.shard.index}of{self.shard.count}" if self.shard else name

    def written(self, name: str) -> None:
        """``name`` is on disk: drop its claim (rank 0), and let every rank go on once it is (a barrier)."""
        if self.world.is_main:
            release(self.run_dir.root, name)
        distributed.barrier()

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
    manifest.writable, manifest.shared = world.is_main, shard is not None or "shards" in manifest.data
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
