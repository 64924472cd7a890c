"""Recipes: the resolved configuration of an ``adapt`` run (defaults < config file < command-line flags).

A recipe file (TOML or YAML) is read as a dict and merged under the flags (:func:`merge`), then typed and
checked into an :class:`AdaptConfig` (:meth:`AdaptConfig.from_dict`) and validated (:func:`validate`).

The parts, each of whose names stays importable from here:

* :mod:`adaptsoup.pipeline.recipe_config` — :class:`AdaptConfig` and its sections, with the paper's defaults;
* :mod:`adaptsoup.pipeline.recipe_values` — values read as their settings' types (recipe tables, ``--set``);
* :mod:`adaptsoup.pipeline.recipe_validation` — refusing a recipe that cannot run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe_config import AdaptConfig, FineTuneConfig, InterTrainConfig, MMCRGrid, MoCoV3Grid
from adaptsoup.pipeline.recipe_validation import validate, validate_ranges
from adaptsoup.pipeline.recipe_values import parse_settings

__all__ = [
    "AdaptConfig", "FineTuneConfig", "InterTrainConfig", "MMCRGrid", "MoCoV3Grid",  # recipe_config
    "parse_settings",  # recipe_values
    "validate", "validate_ranges",  # recipe_validation
    "load_recipe_file", "merge", "with_overrides",  # this module
]


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) recipe as a dict."""
    path = Path(path)
    if not path.is_file():
        raise AdaptsoupError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parse errors of either format
        raise AdaptsoupError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    raise AdaptsoupError(f"recipe must be .toml, .yaml or .yml: {path}")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``None`` in ``override`` means "not given"."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def with_overrides(cfg, overrides: dict[str, Any]):
    """``cfg`` with every override that is not None set on it (a mode's defaults, then the user's flags)."""
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(cfg, key):
                raise AdaptsoupError(f"unknown setting {key!r} for {type(cfg).__name__}")
            setattr(cfg, key, value)
    return cfg
