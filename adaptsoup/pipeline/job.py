"""One ``adaptsoup adapt`` invocation as a library call: :class:`AdaptRequest` -> :func:`run_adapt_job`.

A new run's recipe is the defaults, then a named preset (``--preset``), then the recipe file, then the
settings given as flags.  A resumed run
takes the recipe recorded in its manifest; only what happens after the soups (``mix``, ``tta`` and their
settings) may be given again, to mix or adapt a finished run differently.

With ``shard`` the job makes one part of the grid; the N jobs of a sharded run are given the same flags
and ``--out``: the first creates the run directory, the others (and reruns) join it when its recorded
recipe is theirs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.adapt import AdaptResult, run_adapt
from adaptsoup.pipeline.presets import check_requirements, preset_settings
from adaptsoup.pipeline.recipe import AdaptConfig, load_recipe_file, merge
from adaptsoup.pipeline.shard import Shard

AFTER_SOUPS = ("mix", "mix_labeled", "tta", "tta_batch_size", "tta_base_lr", "tta_guard")  # the settings a resumed run may change
REQUIRED = ("model", "target", "source")


@dataclass
class AdaptRequest:
    settings: dict[str, Any] = field(default_factory=dict)  # recipe keys, nested as in a recipe file; None: not given
    recipe_file: Path | None = None
    resume: Path | None = None  # a run directory to continue with its recorded recipe
    command: str | None = None  # recorded in the manifest
    shard: str | None = None  # "I/N": this job's part of the grid (see adaptsoup.pipeline.shard)
    preset: str | None = None  # a named recipe under the recipe file and the flags (adaptsoup.pipeline.presets)


def run_adapt_job(request: AdaptRequest, *, progress=None, echo: Callable[[str], None] | None = print) -> AdaptResult:
    """Resolve the request's recipe and run (or resume) it, mixing and adapting at test time as it says."""
    shard = Shard.parse(request.shard) if request.shard else None
    return run_adapt(resolve_config(request), progress=progress, echo=echo, command=request.command, shard=shard)


def resolve_config(request: AdaptRequest) -> AdaptConfig:
    """The recipe the request asks for (see the module docstring)."""
    if request.resume is not None:
        return _resumed_config(request)
    raw = preset_settings(request.preset) if request.preset else {}
    raw = merge(raw, load_recipe_file(request.recipe_file)) if request.recipe_file else raw
    merged = merge(raw, request.settings)
    if request.preset:
        check_requirements(request.preset, merged)
    cfg = AdaptConfig.from_dict(merged)
    missing = [f"--{n}" for n in REQUIRED if not getattr(cfg, n) and (n != "source" or cfg.finetune_back)]
    if missing:
        raise AdaptsoupError(f"missing {', '.join(missing)} (or give them in --config)")
    if request.shard and not cfg.out:
        raise AdaptsoupError("--shard needs --out: the run directory every shard shares")
    if not cfg.out:
        cfg.out = str(Path("runs") / time.strftime("adapt-%Y%m%d-%H%M%S"))
    manifest = Path(cfg.out) / "manifest.json"
    if manifest.is_file() and not request.shard and _never_started(manifest):
        manifest.unlink()  # an earlier attempt failed before any work (bad data, a bad model): start afresh
    if manifest.is_file():
        if request.shard and _recorded(manifest) == cfg.to_dict():
            return cfg  # another shard of the same run (or this shard again)
        hint = " with another recipe: give every shard the same flags" if request.shard else ""
        raise AdaptsoupError(f"{cfg.out} already holds a run{hint}: use --resume {cfg.out} to continue it, or another --out")
    return cfg


def _never_started(manifest: Path) -> bool:
    """True when the run in ``manifest``'s folder stopped before any work: its inputs were never loaded (no
    ``protocol`` recorded) and it holds no encoder, ingredient, training state or soup."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    made = any(any((manifest.parent / sub).glob("*")) for sub in ("inter", "ingredients", "state", "soups"))
    return isinstance(data, dict) and "protocol" not in data and not made


def _recorded(manifest: Path) -> dict | None:
    """The recipe recorded in a run's manifest, or None while another job is still writing its first one."""
    try:
        return json.loads(manifest.read_text()).get("config")
    except (OSError, ValueError):
        return None


def _resumed_config(request: AdaptRequest) -> AdaptConfig:
    manifest = Path(request.resume) / "manifest.json"
    if not manifest.is_file():
        raise AdaptsoupError(f"--resume {request.resume}: no manifest.json there (not an adapt run directory)")
    changed = ([key for key in _given(request.settings) if key not in AFTER_SOUPS] + (["config"] if request.recipe_file else [])
               + (["preset"] if request.preset else []))
    if changed:
        raise AdaptsoupError(f"--resume takes the recipe recorded in {manifest}; do not also give {', '.join(changed)} "
                             f"(only {', '.join(AFTER_SOUPS)} may change)")
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data["config"], dict):
            raise TypeError("config is not a table")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AdaptsoupError(f"--resume {request.resume}: cannot read the recipe in {manifest} ({type(exc).__name__})") from None
    regiven = set(_given(request.settings))  # mix_labeled given again replaces the recorded one: not checked
    config = {key: value for key, value in data["config"].items() if key not in regiven}
    recorded = _where_the_run_saw_them(config, Path(data.get("cwd") or Path.cwd()), request.resume)
    cfg = AdaptConfig.from_dict(merge(recorded, {key: request.settings.get(key) for key in AFTER_SOUPS}))
    cfg.out = str(request.resume)  # the run is where it is now, whatever folder it was started from
    return cfg


PATH_KEYS = ("model", "target", "source", "stock", "pretrained", "mix_labeled", "validation")  # and each of ``evals``


def _where_the_run_saw_them(config: dict[str, Any], cwd: Path, run: Path) -> dict[str, Any]:
    """The recorded recipe with its relative paths resolved against the folder the run was started from;
    refused when an input is not there any more."""
    from adaptsoup.core.sources import HF_HUB, LOCAL_DIR

    def absolute(key: str, value: str) -> str:
        prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
        if value.startswith(HF_HUB):
            return value
        path = Path(value[len(prefix):]).expanduser()
        path = path if path.is_absolute() else cwd / path
        if not path.exists():
            raise AdaptsoupError(f"--resume {run}: the run's {key} {path} is not there any more (moved?); "
                                 f"put it back, or start a new run")
        return prefix + str(path)

    out = dict(config)
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = absolute(key, str(out[key]))
    out["evals"] = [absolute("--eval folder", str(e)) for e in out.get("evals") or []]
    return out


def _given(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the settings that were given (not None)."""
    keys = []
    for key, value in settings.items():
        if isinstance(value, dict):
            keys += _given(value, f"{prefix}{key}.")
        elif value is not None:
            keys.append(prefix + key)
    return keys
