"""What every stage of an ``adapt`` run reads and writes: the resolved recipe, the run directory with its
manifest and log, the deployed model and the loaded images.  :func:`open_run` builds it; each stage
(:mod:`~adaptsoup.pipeline.inter_train`, :mod:`~adaptsoup.pipeline.finetune_back`, ...) is a function of it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from torch import nn

from adaptsoup.core.data import Preprocess
from adaptsoup.core.manifest import Manifest, environment
from adaptsoup.core.models import class_names, load_model, model_meta, require_vit
from adaptsoup.core.progress import NullProgress
from adaptsoup.core.run_dir import RunDir, RunLog
from adaptsoup.pipeline.diversity import add_parameter_noise, name_seed, tensor_stds
from adaptsoup.pipeline.inputs import RunInputs, load_inputs
from adaptsoup.pipeline.recipe import AdaptConfig, validate
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

    def reload_manifest(self) -> None:
        """Read the manifest again after a library call that wrote it itself (``mix_run``)."""
        self.manifest = Manifest.load_or_new(self.run_dir.manifest)

    @functools.cached_property
    def _noise_stds(self) -> dict[str, float]:
        return tensor_stds(self.deployed.state_dict())

    def add_noise(self, model: nn.Module, multiplier: float, name: str) -> None:
        """Parameter noise of ``multiplier`` x the stock's per-tensor std, seeded by ``name`` (nothing at 0)."""
        if multiplier:
            model.load_state_dict(add_parameter_noise(model.state_dict(), multiplier, self._noise_stds, name_seed(name, self.cfg.seed)))


def open_run(cfg: AdaptConfig, *, progress=None, echo: Callable[[str], None] | None = print, command: str | None = None,
             on_step: Callable[[str, int], None] | None = None) -> RunContext:
    """Check the recipe, create (or reopen) its run directory, record the invocation, load the deployed
    model and decode the images."""
    validate(cfg)
    started = time.perf_counter()
    progress = progress or NullProgress()
    run_dir = RunDir(Path(cfg.out)).create()
    log = RunLog(run_dir.log, echo)
    manifest = Manifest.load_or_new(run_dir.manifest, kind="adapt")
    manifest.data.update(command=command or " ".join(sys.argv), config=cfg.to_dict(), environment=environment())
    manifest.data.setdefault("timings_s", {})
    manifest.data.setdefault("ingredients", {})
    manifest.save()
    deployed = require_vit(load_model(cfg.arch, cfg.model), "adapt")
    t0 = time.perf_counter()
    inputs = load_inputs(cfg, Preprocess.for_model(deployed), class_names(deployed), progress)
    manifest.data["data"] = inputs.records()
    manifest.data["timings_s"]["load_data"] = time.perf_counter() - t0
    manifest.save()
    ctx = RunContext(cfg, run_dir, manifest, log, deployed, inputs, progress=progress, on_step=on_step, started=started)
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
