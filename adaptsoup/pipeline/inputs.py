"""The images an ``adapt`` run reads: unlabeled target, labeled source, labeled eval folders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptsoup.core.data import ImageSet, Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe import AdaptConfig


@dataclass
class RunInputs:
    preprocess: Preprocess  # the deployed model's
    target: ImageSet
    source: ImageSet | None  # None: no labeled source (label-free ingredients)
    evals: dict[str, ImageSet]  # folder name -> labeled images
    validation: ImageSet | None = None  # labeled in-distribution images for the estimates (None: no estimates)
    validation_origin: str = "none"  # where they come from, in words (the log and the manifest say it)

    def inter_data(self, cfg: AdaptConfig) -> ImageSet:
        """What inter-training sees, without labels: the target (Self-Soupervision) or the source (continued SSL)."""
        return self.target if cfg.inter.data == "target" else strip_labels(self.source)

    def records(self) -> dict:
        """The manifest's ``data`` section: roots, counts and skipped files."""
        return {"target": _record(self.target), "source": _record(self.source) if self.source is not None else None,
                "evals": {k: _record(v) for k, v in self.evals.items()},
                "validation": {**_record(self.validation), "origin": self.validation_origin} if self.validation is not None else None}

    def skipped_lines(self) -> list[str]:
        """One log line per folder that had unreadable files."""
        lines = []
        for label, images in (("target", self.target), ("source", self.source), ("validation", self.validation), *self.evals.items()):
            if images is not None and images.skipped:
                shown = ", ".join(f"{p} ({r})" for p, r in images.skipped[:5]) + (" ..." if len(images.skipped) > 5 else "")
                lines.append(f"{label}: skipped {len(images.skipped)} file(s) (unreadable or not images): {shown}")
        return lines


def load_inputs(cfg: AdaptConfig, preprocess: Preprocess, class_names: list[str], progress) -> RunInputs:
    """Decode the recipe's folders (seeded subsets where ``max_*_images`` asks for them)."""
    _check_unique_eval_names(cfg.evals)
    target = load_folder(cfg.target, preprocess, progress=progress, description="decode target")
    source = None
    if cfg.source:
        source = load_folder(cfg.source, preprocess, labeled=True, class_names=class_names, progress=progress, description="decode source")
        source = seeded_subset(source, cfg.max_source_images, cfg.seed)
    target = seeded_subset(target, cfg.max_target_images, cfg.seed)
    evals = {Path(e).name or str(e): load_folder(e, preprocess, labeled=True, class_names=class_names, progress=progress,
                                                 description=f"decode {Path(e).name}") for e in cfg.evals}
    validation, origin = None, "none: no --validation folder and no source images held out (validation_holdout = 0)"
    if cfg.validation:
        validation = load_folder(cfg.validation, preprocess, labeled=True, class_names=class_names, progress=progress,
                                 description="decode validation")
        origin = f"the --validation folder {cfg.validation}"
    elif source is not None and cfg.validation_holdout:
        count = min(cfg.validation_holdout, len(source) // 10)  # never more than a tenth of the source
        if count:
            kept, held = holdout_split(source.labels, count, cfg.seed)
            source, validation = source.subset(kept), source.subset(held)
            origin = (f"{count} source images held out of every fine-tuning (seeded, class-balanced); if the deployed "
                      "model trained on them, its estimates are optimistic")
    return RunInputs(preprocess, target, source, evals, validation, origin)


def holdout_split(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices: ``count`` images held out, as equally from every class as the classes allow
    (a seeded draw within each class), both sorted."""
    gen = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    by_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in by_class]
    held, round_ = [], 0
    while len(held) < count:
        for idx in by_class:
            if round_ < len(idx) and len(held) < count:
                held.append(int(idx[round_]))
        round_ += 1
    held_t = torch.tensor(sorted(held), dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_t] = False
    return torch.nonzero(mask).flatten(), held_t


def seeded_subset(images: ImageSet, limit: int, seed: int) -> ImageSet:
    """``limit`` images drawn without replacement (in folder order), or all of them when ``limit`` is 0."""
    if not limit or limit >= len(images):
        return images
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=gen)[:limit].sort().values
    return images.subset(idx)


def strip_labels(images: ImageSet) -> ImageSet:
    return dataclasses.replace(images, labels=None)


def _record(images: ImageSet) -> dict:
    return {"root": images.root, "images": len(images), "skipped": len(images.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in images.skipped[:100]]}


def _check_unique_eval_names(evals: list[str]) -> None:
    names = [Path(e).name for e in evals]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise AdaptsoupError(f"--eval folders must have distinct names; repeated: {', '.join(sorted(dupes))}")
