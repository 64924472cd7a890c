"""``adaptsoup estimate``'s work: run each checkpoint once over the unlabeled target images and the labeled
validation images, then every label-free estimate and the deploy recommendation (:mod:`adaptsoup.estimate`).

One model is in memory at a time; only its logits are kept.  Checkpoints must be adaptsoup ``.safetensors``
files (their metadata names the architecture, classes and preprocessing), and every model must have the
same classes: the estimates compare models on the same task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from adaptsoup.core.checkpoint import SAFETENSORS_SUFFIXES, CheckpointMeta, read_meta
from adaptsoup.core.data import ImageSet, Preprocess, load_folder, shown_path
from adaptsoup.core.evaluation import run_model
from adaptsoup.core.models import load_model
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError, CheckpointError
from adaptsoup.estimate import DecisionConfig, EstimateConfig, estimate_and_recommend


def model_names(paths: Sequence[Path]) -> list[str]:
    """Short, distinct names: the file stem, or ``parent/stem`` (then the path itself) where stems repeat."""
    for name_of in (lambda p: p.stem, lambda p: f"{p.parent.name}/{p.stem}", lambda p: shown_path(p)):
        names = [name_of(Path(p)) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise AdaptsoupError(f"the same checkpoint is given twice: {', '.join(shown_path(p) for p in paths)}")


def read_metas(paths: Sequence[Path], names: Sequence[str]) -> list[CheckpointMeta]:
    """Each checkpoint's metadata, refusing what is not an adaptsoup safetensors file or has other classes."""
    metas = []
    for path in paths:
        if Path(path).suffix not in SAFETENSORS_SUFFIXES:
            raise CheckpointError(f"estimate reads adaptsoup .safetensors checkpoints only, got {shown_path(path)}")
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {shown_path(path)}")
        meta = read_meta(path)
        if meta is None:
            raise CheckpointError(f"{shown_path(path)} carries no adaptsoup metadata (classes, preprocessing): estimate needs adaptsoup checkpoints")
        metas.append(meta)
    first = metas[0]
    for name, meta in zip(names, metas):
        if meta.num_classes != first.num_classes or list(meta.class_names) != list(first.class_names):
            raise AdaptsoupError(f"class mismatch: {names[0]} has {first.num_classes} classes ({_shown_classes(first)}) "
                                 f"but {name} has {meta.num_classes} ({_shown_classes(meta)}); the models must share their classes")
    return metas


def _shown_classes(meta: CheckpointMeta) -> str:
    names = list(meta.class_names)
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "unnamed"


def _same_images(sets: list[tuple[ImageSet, ImageSet]]) -> None:
    """Models with different preprocessing decode the folders separately: they must have read the same files."""
    target, validation = sets[0]
    for other_target, other_validation in sets[1:]:
        if other_target.paths != target.paths or other_validation.paths != validation.paths:
            raise AdaptsoupError("the models' preprocessing differ and their decoders read different files; estimate them separately")


def estimate_checkpoints(models: Sequence[str | os.PathLike], target: str | os.PathLike, validation: str | os.PathLike, *,
                         deployed: str | os.PathLike | None = None, config: EstimateConfig = EstimateConfig(),
                         decision: DecisionConfig = DecisionConfig(), device: str = "cpu", batch_size: int = 256,
                         progress=None, log: Callable[[str], None] = lambda line: None) -> dict:
    """Every estimate of every checkpoint on ``target`` (unlabeled folder) with ``validation`` (labeled
    ``class_name/<image>`` folder of in-distribution images the models were not trained on), and the
    recommendation against ``deployed`` (default: the first model; added to ``models`` when not among them).

    Returns :func:`adaptsoup.estimate.estimate_and_recommend`'s dictionary plus ``"inputs"`` (paths, image
    counts, skipped files).  Bad input raises a one-line AdaptsoupError.
    """
    paths = [Path(p) for p in models]
    if not paths:
        raise AdaptsoupError("give at least one model to estimate")
    if deployed is not None and Path(deployed).resolve() not in [p.resolve() for p in paths]:
        paths.insert(0, Path(deployed))
    deployed_index = 0 if deployed is None else [p.resolve() for p in paths].index(Path(deployed).resolve())
    names = model_names(paths)
    metas = read_metas(paths, names)
    progress = progress or NullProgress()
    decoded: dict[Preprocess, tuple[ImageSet, ImageSet]] = {}
    target_logits: dict[str, torch.Tensor] = {}
    validation_logits: dict[str, torch.Tensor] = {}
    task = progress.add_task("run models", total=len(paths))
    for name, path, meta in zip(names, paths, metas):
        model = load_model(None, path)
        pre = Preprocess.for_model(model)
        if pre not in decoded:
            decoded[pre] = (load_folder(target, pre, progress=progress, description="decode target"),
                            load_folder(validation, pre, labeled=True, class_names=list(meta.class_names) or None,
                                        progress=progress, description="decode validation"))
        target_set, validation_set = decoded[pre]
        target_logits[name] = run_model(model, target_set, pre, batch_size=batch_size, device=device).logits
        validation_logits[name] = run_model(model, validation_set, pre, batch_size=batch_size, device=device).logits
        del model
        progress.advance(task)
    progress.remove_task(task)
    _same_images(list(decoded.values()))
    target_set, validation_set = next(iter(decoded.values()))
    for label, images in (("target", target_set), ("validation", validation_set)):
        if images.skipped:
            log(f"{label}: skipped {len(images.skipped)} file(s) (unreadable or not images), e.g. {images.skipped[0][0]}")
    log(f"estimating {len(names)} model(s) on {len(target_set)} target and {len(validation_set)} validation images")
    result = estimate_and_recommend(target_logits, validation_logits, validation_set.labels, names[deployed_index], config, decision)
    result["inputs"] = {
        "models": {name: str(path) for name, path in zip(names, paths)},
        "deployed": names[deployed_index],
        "target": {"root": target_set.root, "images": len(target_set), "skipped": len(target_set.skipped)},
        "validation": {"root": validation_set.root, "images": len(validation_set), "skipped": len(validation_set.skipped)},
    }
    return result
