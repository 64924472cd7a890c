"""Which checkpoint ``export`` writes when it is given an ``adapt`` run, or a model inside one: the run's
deploy recommendation (:mod:`adaptsoup.pipeline.recommend`) decides, and a candidate the run estimated to be
worse than the deployed model is refused unless forced.

``export --model RUN`` exports what the run recommends (the deployed model itself when the rule kept it).
``export --model RUN/soup.safetensors`` (or any soup the run estimated) exports that file, unless the mean
of its voting estimators' gains over the deployed model is below zero: then ``--force`` is needed.
A file that is not in a run directory, or that the run did not estimate, is exported as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adaptsoup.errors import AdaptsoupError


@dataclass(frozen=True)
class ExportChoice:
    path: Path
    note: str | None  # what the run's recommendation said about it, for the log (None: no run around it)


def _manifest(folder: Path) -> dict | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise AdaptsoupError(f"cannot read {manifest}") from None
    return data if isinstance(data, dict) and data.get("kind") == "adapt" else None


def _run_of(path: Path) -> tuple[Path, dict] | None:
    """The adapt run directory holding ``path`` (the folder itself, or up to two levels up), with its manifest."""
    for folder in [path, *list(path.parents)[:2]] if path.is_dir() else list(path.parents)[:2]:
        data = _manifest(folder)
        if data is not None:
            return folder, data
    return None


def _deployed_path(data: dict) -> Path:
    """The run's deployed model, a relative path taken from the folder the run was started in."""
    model = Path(data.get("config", {}).get("model", ""))
    return model if model.is_absolute() else Path(data.get("cwd") or ".") / model


def resolve_export(model: Path, force: bool = False) -> ExportChoice:
    """The checkpoint to export for ``--model`` (a file, or an adapt run directory); see the module docstring."""
    model = Path(model)
    found = _run_of(model)
    if found is None:
        if model.is_dir() and not (model / "config.json").is_file() and not any(model.glob("*.safetensors")):
            raise AdaptsoupError(f"--model {model} is a folder but not an adapt run (no manifest.json) nor a model folder")
        return ExportChoice(model, None)
    run, data = found
    rec = data.get("recommendation")
    if model.is_dir() and model.resolve() == run.resolve():
        if rec is None:
            raise AdaptsoupError(f"{run} holds no deploy recommendation (the run had no validation images); export one of its "
                                 f"files by path, e.g. --model {run / 'soup.safetensors'}")
        if not rec["switch"]:
            return ExportChoice(_deployed_path(data), f"the run recommends keeping the deployed model ({rec['reason']})")
        return ExportChoice(run / rec["path"], f"the run recommends {rec['model']}: estimated {rec['gain']:+.2f} points "
                                              f"[{rec['ci95'][0]:+.2f}, {rec['ci95'][1]:+.2f}] over the deployed model")
    if rec is None:
        return ExportChoice(model, f"{run} holds no deploy recommendation (no validation images): exported unchecked")
    paths = rec.get("candidate_paths", {})
    verdict = next((c for c in rec["candidates"] if c["name"] in paths and (run / paths[c["name"]]).resolve() == model.resolve()), None)
    if verdict is None:
        return ExportChoice(model, f"{model.name} was not among the candidates {run} estimated")
    if verdict["mean_gain"] is not None and verdict["mean_gain"] < 0 and not force:
        raise AdaptsoupError(f"{run} estimates {verdict['name']} {verdict['mean_gain']:+.2f} points below the deployed model "
                             f"({verdict['why']}); export it anyway with --force, or export the run's recommendation with --model {run}")
    gain = "no estimate" if verdict["mean_gain"] is None else f"estimated {verdict['mean_gain']:+.2f} points over the deployed model"
    return ExportChoice(model, f"{verdict['name']}: {gain}" + (" (forced)" if force and (verdict["mean_gain"] or 0) < 0 else ""))

