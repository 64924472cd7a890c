"""One ``adaptsoup adapt`` invocation as a library call: :class:`AdaptRequest` -> :func:`run_adapt_job`.

A new run's recipe is the defaults, then the recipe file, then the settings given as flags.  A resumed run
takes the recipe recorded in its manifest; only what happens after the soups (``mix``, ``tta`` and their
settings) may be given again, to mix or adapt a finished run differently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.adapt import AdaptResult, run_adapt
from adaptsoup.pipeline.recipe import AdaptConfig, load_recipe_file, merge

AFTER_SOUPS = ("mix", "mix_labeled", "tta", "tta_batch_size", "tta_base_lr")  # the settings a resumed run may change
REQUIRED = ("model", "target", "source")


@dataclass
class AdaptRequest:
    settings: dict[str, Any] = field(default_factory=dict)  # recipe keys, nested as in a recipe file; None: not given
    recipe_file: Path | None = None
    resume: Path | None = None  # a run directory to continue with its recorded recipe
    command: str | None = None  # recorded in the manifest


def run_adapt_job(request: AdaptRequest, *, progress=None, echo: Callable[[str], None] | None = print) -> AdaptResult:
    """Resolve the request's recipe and run (or resume) it, mixing and adapting at test time as it says."""
    return run_adapt(resolve_config(request), progress=progress, echo=echo, command=request.command)


def resolve_config(request: AdaptRequest) -> AdaptConfig:
    """The recipe the request asks for (see the module docstring)."""
    if request.resume is not None:
        return _resumed_config(request)
    raw = load_recipe_file(request.recipe_file) if request.recipe_file else {}
    cfg = AdaptConfig.from_dict(merge(raw, request.settings))
    missing = [f"--{n}" for n in REQUIRED if not getattr(cfg, n) and (n != "source" or cfg.finetune_back)]
    if missing:
        raise AdaptsoupError(f"missing {', '.join(missing)} (or give them in --config)")
    if not cfg.out:
        cfg.out = str(Path("runs") / time.strftime("adapt-%Y%m%d-%H%M%S"))
    if (Path(cfg.out) / "manifest.json").is_file():
        raise AdaptsoupError(f"{cfg.out} already holds a run: use --resume {cfg.out} to continue it, or another --out")
    return cfg


def _resumed_config(request: AdaptRequest) -> AdaptConfig:
    manifest = Path(request.resume) / "manifest.json"
    if not manifest.is_file():
        raise AdaptsoupError(f"--resume {request.resume}: no manifest.json there (not an adapt run directory)")
    changed = [key for key in _given(request.settings) if key not in AFTER_SOUPS] + (["config"] if request.recipe_file else [])
    if changed:
        raise AdaptsoupError(f"--resume takes the recipe recorded in {manifest}; do not also give {', '.join(changed)} "
                             f"(only {', '.join(AFTER_SOUPS)} may change)")
    recorded = json.loads(manifest.read_text())["config"]
    return AdaptConfig.from_dict(merge(recorded, {key: request.settings.get(key) for key in AFTER_SOUPS}))


def _given(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the settings that were given (not None)."""
    keys = []
    for key, value in settings.items():
        if isinstance(value, dict):
            keys += _given(value, f"{prefix}{key}.")
        elif value is not None:
            keys.append(prefix + key)
    return keys
