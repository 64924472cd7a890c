"""ImageNet-C and LAION-C as shift benchmarks (``adaptsoup bench imagenet-c``).

Supported layouts (see ``shared/reference``):

* ImageNet-C: ``ROOT/<corruption>/<severity 1..5>/<wnid>/<image>``; labels are WordNet ids, scored as
  1000-way top-1 in the standard class order (sorted wnids = ``imagenet_class_index.json``).
* LAION-C: ``ROOT/<distortion>/intensity_level_<k>/<superclass>/<image>``; labels are 16 superclasses
  covering 285 ImageNet classes (``category_mapping.json``).  A 1000-way model is scored by averaging its
  softmax probabilities over each superclass's member classes and taking the argmax over superclasses.

Within each corruption (distortion) folder the files are sorted by their path below the severity folder;
``--split tuning`` / ``report`` keeps the first / second half of each class folder's files
(:func:`class_halves`), then ``per_corruption`` of them are drawn (:func:`subset_sorted`); even positions of
what is left are the unlabeled target, odd positions the evaluation data.  The split folders are built from symbolic links (copies where
links are not allowed), so no image is duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from adaptsoup.core.data import IMAGE_SUFFIXES, Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError

LAYOUTS = ("imagenet-c", "laion-c")


def default_mapping_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "laion-c"


def detect_layout(root: Path) -> str:
    for corruption in sorted(p for p in root.iterdir() if p.is_dir()):
        subdirs = [p.name for p in corruption.iterdir() if p.is_dir()]
        if any(name.startswith("intensity_level_") for name in subdirs):
            return "laion-c"
        if any(name.isdigit() for name in subdirs):
            return "imagenet-c"
    raise AdaptsoupError(f"{root} has neither the ImageNet-C layout (<corruption>/<severity>/<wnid>/<image>) "
                         "nor LAION-C's (<distortion>/intensity_level_<k>/<superclass>/<image>)")


def level_dir(layout: str, severity: int) -> str:
    return f"intensity_level_{severity}" if layout == "laion-c" else str(severity)


def scan_shift_tree(root: Path, layout: str, severity: int, corruptions: list[str] | None = None) -> dict[str, list[tuple[Path, str]]]:
    """``{corruption: [(file, label folder)]}`` sorted by path, for one severity."""
    root = Path(root)
    if not root.is_dir():
        raise AdaptsoupError(f"benchmark root not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / level_dir(layout, severity)).is_dir())
    if corruptions:
        missing = [c for c in corruptions if c not in found]
        if missing:
            raise AdaptsoupError(f"{root}: no severity {severity} folder for {', '.join(missing)} (found: {', '.join(found)})")
        found = list(corruptions)
    if not found:
        raise AdaptsoupError(f"{root}: no corruption has a severity {severity} folder ({level_dir(layout, severity)}/)")
    out = {}
    for corruption in found:
        base = root / corruption / level_dir(layout, severity)
        files = sorted((p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p.relative_to(base).as_posix())
        if not files:
            raise AdaptsoupError(f"{base} holds no images")
        out[corruption] = [(p, p.relative_to(base).parts[0]) for p in files]
    return out


def link_file(path: Path, target: Path) -> None:
    """``target`` as a symbolic link to ``path`` (a copy where links are not allowed); an existing one is kept."""
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(path.resolve(), target)
    except OSError:
        shutil.copy2(path, target)


def link_splits(files: dict[str, list[tuple[Path, str]]], dest: Path) -> Path:
    """``dest/{even,odd}/<corruption>/<label>/<file>`` as links to the originals (even/odd by sorted position)."""
    for corruption, items in files.items():
        for pos, (path, label) in enumerate(items):
            link_file(path, dest / ("even" if pos % 2 == 0 else "odd") / corruption / label / path.name)
    return dest


def class_halves(items: list[tuple[Path, str]], split: str) -> list[tuple[Path, str]]:
    """The ``split`` of one folder's sorted ``(file, class)`` list: ``all`` keeps every file; ``tuning`` / ``report``
    keep, within each class, the first / second half of its files in that order (``len // 2`` files go to
    tuning, the rest to report), as :func:`adaptsoup_bench.shift.split_pool` halves CIFAR-10's test classes."""
    from adaptsoup_bench.shift import split_pool

    if not items:
        return items
    keep = split_pool(np.asarray([label for _, label in items]), split)
    return [items[int(i)] for i in keep]


def select_shift_files(root: Path, layout: str, severity: int, corruptions: list[str] | None = None, *, split: str = "all",
                       per_corruption: int = 0, seed: int = 0) -> dict[str, list[tuple[Path, str]]]:
    """The files of each corruption that take part: the split's class halves (:func:`class_halves`) of the sorted
    files, then at most ``per_corruption`` of them (:func:`subset_sorted`), in sorted order."""
    files = scan_shift_tree(root, layout, severity, corruptions)
    halves = {c: class_halves(items, split) for c, items in files.items()}
    empty = [c for c, items in halves.items() if not items]
    if empty:
        raise AdaptsoupError(f"{root}: the {split} split of {', '.join(empty)} holds no images (every class folder needs "
                             "two images or more to be halved)")
    return subset_sorted(halves, per_corruption, seed)


def imagenet_wnids(mapping_dir: Path) -> list[str]:
    index = json.loads((Path(mapping_dir) / "imagenet_class_index.json").read_text())
    return [index[str(i)][0] for i in range(len(index))]


def superclass_membership(mapping_dir: Path) -> tuple[list[str], torch.Tensor]:
    """LAION-C's superclass names and a ``[1000, 16]`` 0/1 matrix of member classes."""
    mapping = json.loads((Path(mapping_dir) / "category_mapping.json").read_text())
    wnids = imagenet_wnids(mapping_dir)
    position = {w: i for i, w in enumerate(wnids)}
    names = list(mapping)
    member = torch.zeros(len(wnids), len(names))
    for j, name in enumerate(names):
        for w in mapping[name]:
            if w not in position:
                raise AdaptsoupError(f"category_mapping.json names {w}, which is not an ImageNet-1k class")
            member[position[w], j] = 1.0
    return names, member


def superclass_scorer(member: torch.Tensor):
    """Score 1000-way logits against superclass labels: mean member probability, argmax over superclasses."""
    counts = member.sum(dim=0).clamp(min=1)

    def score(logits: torch.Tensor, labels: torch.Tensor) -> float:
        if logits.shape[1] != member.shape[0]:
            raise AdaptsoupError(f"LAION-C scoring needs a {member.shape[0]}-way ImageNet model, got {logits.shape[1]} classes")
        probs = logits.float().softmax(dim=1)
        pred = ((probs @ member) / counts).argmax(dim=1)
        return float((pred == labels).float().mean() * 100)

    return score


def subset_sorted(files: dict[str, list[tuple[Path, str]]], per_corruption: int, seed: int) -> dict[str, list[tuple[Path, str]]]:
    """At most ``per_corruption`` files of each corruption: a seeded random choice kept in sorted order (0: all)."""
    if per_corruption <= 0:
        return files
    out = {}
    for corruption, items in files.items():
        if len(items) <= per_corruption:
            out[corruption] = items
            continue
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:per_corruption])
        out[corruption] = [items[i] for i in keep]
    return out


def wnid_stock(stock_path: Path, mapping_dir: Path, work: Path) -> Path:
    """The stock, or for an ImageNet-sized model whose class names are not wnids a copy of it carrying the wnids
    in the standard order (``work/stock_wnids.safetensors``), so that ImageNet-C's and the source's wnid folders
    match its classes."""
    from adaptsoup.core.checkpoint import read_checkpoint, save_checkpoint
    from adaptsoup.core.models import class_names, load_model, model_meta, set_class_names

    model = load_model(None, stock_path)
    wnids = imagenet_wnids(mapping_dir)
    if model.num_classes != len(wnids) or class_names(model) == wnids:
        return stock_path
    set_class_names(model, wnids)
    state, _ = read_checkpoint(stock_path)
    return save_checkpoint(work / "stock_wnids.safetensors", state,
                           model_meta(model, made_by="adaptsoup bench", parents=[str(stock_path)], note="class names set to ImageNet wnids"))


def labels_and_score(layout: str, stock_path: Path, mapping_dir: Path):
    """The label folders' names (wnids, or LAION-C's superclasses) in label order, and the scorer of logits."""
    from adaptsoup.core.evaluation import top1
    from adaptsoup.core.models import class_names, load_model

    if layout == "laion-c":
        labels, member = superclass_membership(mapping_dir)
        return labels, superclass_scorer(member)
    return class_names(load_model(None, stock_path)), top1


def prepare_shift_benchmark(files: dict[str, list[tuple[Path, str]]], layout: str, stock_path: Path, mapping_dir: Path, work: Path,
                            split_root: Path, pre: Preprocess, progress=None) -> tuple[Path, dict, object, Path, list[str]]:
    """Split folders of the selected ``files`` (:func:`select_shift_files`) under ``split_root``, their image sets and
    the scorer; returns (target, evals, score, stock to use, label names)."""
    if layout not in LAYOUTS:
        raise AdaptsoupError(f"--layout must be auto, {' or '.join(LAYOUTS)}")
    link_splits(files, split_root)
    stock_path = wnid_stock(stock_path, mapping_dir, work)
    labels, score = labels_and_score(layout, stock_path, mapping_dir)
    evals = {}
    for corruption in files:
        for split in ("odd", "even"):
            evals[f"{split}/{corruption}"] = load_folder(split_root / split / corruption, pre, labeled=True, class_names=labels,
                                                         progress=progress, description=f"decode {split}/{corruption}")
    return split_root / "even", evals, score, stock_path, labels
