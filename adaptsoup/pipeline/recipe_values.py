"""Values of a recipe read as their settings' types: a recipe's table (from a file, flags or a manifest) into a
typed config, every value checked against its field's annotation with the key's path in the message; and
``--set KEY=VALUE`` flags as typed overrides.

The types are read from the annotations as written (``from __future__ import annotations``): int, float,
bool, str, their lists, ``X | None``, and the nested sections of :mod:`adaptsoup.pipeline.recipe_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from adaptsoup.errors import AdaptsoupError


def _as_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_SCALARS = {"int": int, "float": float, "bool": _as_bool, "str": str}
_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
_SECTIONS = frozenset({"InterTrainConfig", "FineTuneConfig", "MoCoV3Grid", "MMCRGrid"})  # nested tables (recipe_config)


def build_typed(cls, raw: Any, section: str):
    """``raw`` (a recipe's table) as a ``cls`` instance: unknown keys refused, every value typed by its field's
    annotation, nested sections built the same way; ``section`` is the table's path in messages ("" at the top)."""
    if not isinstance(raw, dict):
        what = f"[{section}]" if section else "a recipe"
        raise AdaptsoupError(f"{what} must be a table of settings (key = value), got {shown_value(raw)}")
    known = {f.name: f for f in fields(cls)}
    unknown = [str(k) for k in raw if k not in known]
    if unknown:
        where = f"[{section}] " if section else ""
        raise AdaptsoupError(f"unknown recipe key(s) {where}{', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    obj = cls()
    for key, value in raw.items():
        path = f"{section}.{key}" if section else key
        kind = str(known[key].type).replace(" ", "")
        if kind in _SECTIONS:
            setattr(obj, key, build_typed(type(getattr(obj, key)), {} if value is None else value, path))
        else:
            setattr(obj, key, _typed(value, kind, path))
    return obj


def _typed(value: Any, kind: str, path: str) -> Any:
    """``value`` as the annotation ``kind`` says (int, float, bool, str, their lists, ``X | None``), or an error."""
    if kind.endswith("|None"):
        return None if value is None else _typed(value, kind.removesuffix("|None"), path)
    if not kind.startswith("list["):
        return _scalar(value, kind, path)
    item = kind[len("list["):-1]
    if isinstance(value, str):  # "1e-5, 2e-5": a comma-separated list
        parts = [part.strip() for part in value.split(",") if part.strip()]
        return [_scalar(_parsed(part, item, f"{path}[{i}]"), item, f"{path}[{i}]") for i, part in enumerate(parts)]
    values = value if isinstance(value, list) else [value]
    return [_scalar(v, item, f"{path}[{i}]") for i, v in enumerate(values)]


def _parsed(text: str, kind: str, path: str) -> Any:
    try:
        return _SCALARS[kind](text)
    except ValueError:
        raise AdaptsoupError(f"{path}: expected {_NAMES[kind]}, got {shown_value(text)}") from None


def _scalar(value: Any, kind: str, path: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise AdaptsoupError(f"{path}: expected {_NAMES[kind]}, got {shown_value(value)}")
    return float(value) if kind == "float" else value


def shown_value(value: Any) -> str:
    """``value`` as messages show it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_settings(assignments: list[str], *classes, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """``["inter_steps=500", "inter_lrs=1e-5,2e-5"]`` as typed overrides of the fields of the dataclasses
    ``classes`` (int, float, bool, str, their lists — comma-separated — and optional forms: ``none`` for None).
    ``reserved`` maps settings that have their own flag to that flag."""
    reserved = reserved or {}
    fields = {f.name: str(f.type) for cls in reversed(classes) for f in dataclasses.fields(cls)
              if _settable(str(f.type)) and f.name not in reserved}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if key in reserved:
            raise AdaptsoupError(f"--set {key}: use {reserved[key]} instead")
        if not sep or key not in fields:
            known = ", ".join(sorted(fields))
            raise AdaptsoupError(f"--set wants KEY=VALUE with KEY one of: {known}; got {item!r}")
        kind = fields[key].replace(" ", "")
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if optional and text.lower() == "none":
            out[key] = None
            continue
        try:
            if kind.startswith("list["):
                scalar = _SCALARS[kind[len("list["):-1]]
                out[key] = [scalar(part.strip()) for part in text.split(",") if part.strip()]
            else:
                out[key] = _SCALARS[kind](text)
        except (KeyError, ValueError) as exc:
            raise AdaptsoupError(f"--set {key}: cannot read {text!r} as {fields[key]} ({exc})") from None
    return out


def _settable(annotation: str) -> bool:
    kind = annotation.replace(" ", "").removesuffix("|None")
    return kind in _SCALARS or (kind.startswith("list[") and kind[len("list["):-1] in _SCALARS)
