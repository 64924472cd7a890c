"""``adaptsoup bench imagenet-c``: ImageNet-C and LAION-C trees under the protocol of ``bench c10c`` (issue #21).

The rows, tables, paired bootstrap and results are :func:`adaptsoup_bench.shift.run_shift_benchmark`'s; this
module turns a released tree (layouts in :mod:`adaptsoup_bench.shiftsets`) into its :class:`ShiftData`.

* **Protocol** (``protocol``): ``deployed`` makes every ingredient from the deployed model (``--model``);
  ``pretrained`` (the paper's) makes them from the pre-trained stock it was fine-tuned from, ``--pretrained``
  (default: ``<model stem>_mae.safetensors`` beside the model, where ``bench c10c`` finds its own), and adds
  the task-vector rows ``self_task_vector_soup`` and, with ``cont_ssl`` (on by default), its control
  ``cont_ssl_task_vector_soup`` (MAE on the source images).
* **Split** (``split``): within every corruption folder and every class folder (a wnid, or a LAION-C
  superclass), that class's images in sorted order (their path below the severity folder): ``tuning`` is
  the first half (``n // 2`` images), ``report`` the rest, ``all`` every image (:func:`class_halves`). The
  halves are disjoint, class-balanced and fixed by the file names alone. ImageNet-C names an image after its
  validation file under every corruption, so a tuning image is the same validation image under every
  corruption. The clean folder (``--clean``) is halved by the same rule, class folder by class folder.
  Then ``per_corruption`` images of each corruption's half are drawn (seed ``seed``, kept in sorted order;
  even positions: unlabeled target, odd: evaluation) and ``clean_images`` of the clean half (seed
  ``seed + 1``), as ``bench c10c`` draws its test images. Settings are chosen on ``tuning``; ``report`` is
  run once with the frozen recipe. The results' ``split`` entry names the files that served.

``data`` of the config records the root, source and clean folders, so the work folder and the trained
files shared between configurations are keyed by them (two trees never share images or ingredients).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from adaptsoup.core.data import IMAGE_SUFFIXES, Preprocess, load_folder
from adaptsoup.core.models import load_model
from adaptsoup.core.progress import NullProgress
from adaptsoup.errors import AdaptsoupError
from adaptsoup_bench.shift_estimates import superclass_logits
from adaptsoup_bench.shift import PROTOCOLS, SPLITS, BenchConfig, ShiftData, bench_work_dir, results_stem, run_shift_benchmark
from adaptsoup_bench.shiftsets import (
    LAYOUTS, class_halves, default_mapping_dir, detect_layout, level_dir, link_file, prepare_shift_benchmark, select_shift_files,
    subset_sorted, superclass_membership,
)

SPLIT_TEXT = {
    "tuning": "in every corruption folder and every class folder, the first half (n // 2) of the class's images in sorted "
              "order (path below the severity folder); settings are chosen here, default severity 3",
    "report": "the second half of each class folder's images (the rest); run once with the frozen recipe, default severity 5",
    "all": "every image of the tree (the benchmark before issue #21)",
}


def check_protocol(cfg: BenchConfig) -> Path | None:
    """The protocol and split are known ones, and under ``pretrained`` the pre-trained stock exists: its path."""
    if cfg.protocol not in PROTOCOLS:
        raise AdaptsoupError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.split not in SPLITS:
        raise AdaptsoupError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if cfg.protocol != "pretrained":
        return None
    model = Path(cfg.stock)
    path = Path(cfg.pretrained) if cfg.pretrained else model.with_name(model.stem + "_mae.safetensors")
    if not path.is_file():
        raise AdaptsoupError(f"pre-trained stock not found: {path} (--protocol pretrained starts every ingredient from the checkpoint "
                             f"the deployed model was fine-tuned from: pass --pretrained PATH, or put it beside --model as "
                             f"{model.stem}_mae.safetensors)")
    return path


def clean_selection(clean: Path, layout: str, labels: list[str], mapping_dir: Path, split: str, count: int,
                    seed: int) -> list[tuple[Path, str, str]]:
    """The clean images that take part: ``(file, label, link name)``, the split's half of every class folder
    (:func:`class_halves`), then ``count`` of them drawn by ``seed`` (0: all), in sorted order.

    ImageNet-C: class folders are wnids of the model. LAION-C: a folder is a superclass, or a wnid of one of
    its member classes (scored as that superclass; wnids outside every superclass are left out)."""
    import json

    if not clean.is_dir():
        raise AdaptsoupError(f"clean folder not found: {clean}")
    member_of = {}
    if layout == "laion-c":
        mapping = json.loads((mapping_dir / "category_mapping.json").read_text())
        member_of = {w: name for name, wnids in mapping.items() for w in wnids}
    index = json.loads((mapping_dir / "imagenet_class_index.json").read_text())
    imagenet = {entry[0] for entry in index.values()}
    items: list[tuple[Path, str, str]] = []
    for folder in sorted(p.name for p in clean.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = folder if folder in labels else member_of.get(folder)
        if label is None:
            if layout == "laion-c" and folder in imagenet:
                continue  # an ImageNet class in no LAION-C superclass
            raise AdaptsoupError(f"{clean}: class folder {folder} is not a class of the benchmark "
                                 f"({', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''})")
        base = clean / folder
        files = sorted((p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p.relative_to(base).as_posix())
        for p in class_halves([(p, folder) for p in files], split):
            name = "_".join(p[0].relative_to(base).parts)
            items.append((p[0], label, name if folder == label else f"{folder}_{name}"))
    if not items:
        raise AdaptsoupError(f"{clean}: the {split} split holds no clean images of the benchmark's classes")
    return subset_sorted({"clean": items}, count, seed)["clean"]


def _same_or_each(values: dict) -> dict:
    """``{"every corruption": v}`` when every corruption's value is ``v``, else the values per corruption."""
    distinct = list(values.values())
    return {"every corruption": distinct[0]} if all(v == distinct[0] for v in distinct) else values


def split_description(cfg: BenchConfig, layout: str, root: Path, files: dict[str, list[tuple[Path, str]]],
                      clean: list[tuple[Path, str, str]] | None, clean_root: Path | None) -> dict:
    """Which images served what (the ``split`` entry of the results JSON, as ``bench c10c`` writes it)."""
    level = level_dir(layout, cfg.severity)
    chosen = {c: [p.relative_to(root / c / level).as_posix() for p, _ in items] for c, items in files.items()}
    per_class = {c: dict(sorted(Counter(label for _, label in items).items())) for c, items in files.items()}
    sizes = {len(v) for v in chosen.values()}
    count = f"{min(sizes)}" if len(sizes) == 1 else f"{min(sizes)}-{max(sizes)}"
    return {
        "name": cfg.split, **SPLIT_TEXT, "used": cfg.split, "severity": cfg.severity,
        "corrupted": f"{count} images of the {cfg.split} half of each of {len(files)} corruption folders at severity {cfg.severity} "
                     f"(at most per_corruption={cfg.per_corruption} drawn with seed {cfg.seed}, in sorted order); even positions = "
                     f"unlabeled target, odd positions = evaluation ('disjoint')",
        "clean": (f"{len(clean)} images of the {cfg.split} half of each class folder of {clean_root} (at most clean_images="
                  f"{cfg.clean_images} drawn with seed {cfg.seed + 1})") if clean is not None else "no clean folder (--clean): no clean accuracy",
        "corrupted_files": _same_or_each(chosen), "per_class": _same_or_each(per_class),
        "clean_files": [p.relative_to(clean_root).as_posix() for p, _, _ in clean] if clean is not None else None,
    }


def run_imagenet_c(cfg: BenchConfig, root: str, source: str, *, layout: str = "auto", mapping_dir: str | None = None,
                   clean: str | None = None, command: str = "", progress=None, log: Callable[[str], None] = print) -> dict:
    """ImageNet-C or LAION-C (released layouts) with the protocol, split and rows of ``bench c10c``."""
    progress = progress or NullProgress()
    stock_path = Path(cfg.stock)
    if not stock_path.is_file():
        raise AdaptsoupError(f"model not found: {stock_path} (--model: the deployed 1000-way ImageNet checkpoint)")
    check_protocol(cfg)
    decoder = cfg.decoder
    if decoder is None:
        beside = stock_path.with_name(stock_path.stem + "_mae_decoder.safetensors")
        decoder = str(beside) if beside.is_file() else None
    mapping = Path(mapping_dir) if mapping_dir else default_mapping_dir()
    if not (mapping / "imagenet_class_index.json").is_file():
        raise AdaptsoupError(f"ImageNet class index not found in {mapping} (pass --mapping-dir with imagenet_class_index.json"
                             " and, for LAION-C, category_mapping.json)")
    root_path, clean_path = Path(root), Path(clean) if clean else None
    if not root_path.is_dir():
        raise AdaptsoupError(f"benchmark root not found: {root_path}")
    layout = detect_layout(root_path) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise AdaptsoupError(f"--layout must be auto, {' or '.join(LAYOUTS)}, got {layout!r}")
    results_stem(layout, cfg)  # a bad --label fails before any image is linked
    inputs = {"root": root_path, "source": Path(source), **({"clean": clean_path} if clean_path else {})}
    cfg = dataclasses.replace(cfg, data=cfg.data or "; ".join(f"{k}={p.resolve()}" for k, p in inputs.items()))
    work = bench_work_dir(cfg, layout)
    pre = Preprocess.for_model(load_model(None, stock_path))
    t0 = time.perf_counter()
    files = select_shift_files(root_path, layout, cfg.severity, cfg.corruptions or None, split=cfg.split,
                               per_corruption=cfg.per_corruption, seed=cfg.seed)
    data_dir = work / "data" / (f"{layout}-s{cfg.severity}-n{cfg.per_corruption}-seed{cfg.seed}"
                                + ("" if cfg.split == "all" else f"-{cfg.split}"))
    target, evals, score, stock_for_run, labels = prepare_shift_benchmark(files, layout, stock_path, mapping, work, data_dir, pre, progress)
    chosen_clean = None
    if clean_path is not None:
        chosen_clean = clean_selection(clean_path, layout, labels, mapping, cfg.split, cfg.clean_images, cfg.seed + 1)
        clean_dir = work / "data" / f"clean-{cfg.split}-n{cfg.clean_images}-seed{cfg.seed + 1}"
        for path, label, name in chosen_clean:
            link_file(path, clean_dir / label / name)
        evals = {"clean": load_folder(clean_dir, pre, labeled=True, class_names=labels, progress=progress, description="decode clean"),
                 **evals}
    split = split_description(cfg, layout, root_path, files, chosen_clean, clean_path)
    log(f"data: {layout} at {root_path}, severity {cfg.severity}, split {cfg.split!r}: {len(files)} corruptions, "
        f"{sum(len(v) for v in files.values())} images" + (f", {len(chosen_clean)} clean" if chosen_clean is not None else ""))
    to_labels = superclass_logits(superclass_membership(mapping)[1]) if layout == "laion-c" else None
    data = ShiftData(layout, stock_for_run, decoder, source, target, list(files), evals, pre, score, to_labels=to_labels,
                     notes={"prepare_data_s": round(time.perf_counter() - t0, 1), "root": str(root_path), "layout": layout,
                            "clean": str(clean_path) if clean_path else None, "split": split},
                     chance=100.0 / len(labels) if layout == "imagenet-c" else None)
    return run_shift_benchmark(data, cfg, command=command, progress=progress, log=log)
