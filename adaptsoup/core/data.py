"""Image folders as :class:`ImageSet` s: :func:`load_folder` scans a folder, decodes its images once at the
model's input size and keeps them as one uint8 tensor ``[N, 3, H, W]``, cached on disk so that a second run
over the same folder skips decoding.  Training augmentations and normalisation run from that tensor.

The parts, each of whose names stays importable from here:

* :mod:`adaptsoup.core.scanning` — which files of a folder are images (recursive, sorted; labeled
  ImageFolder layout), what is skipped and why, how results name the images;
* :mod:`adaptsoup.core.decoding` — one file to 8-bit RGB (modes, decompression bombs), resized and
  centre-cropped as timm's eval transform; unreadable files skipped and counted, never fatal;
* :mod:`adaptsoup.core.preprocess` — :class:`Preprocess`, timm's data config, and normalisation;
* :mod:`adaptsoup.core.image_set` — :class:`ImageSet`, the decoded images of one folder;
* :mod:`adaptsoup.core.batches` — training order, augmentations and evaluation batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from adaptsoup.core.batches import AUGMENTATIONS, augment_batch, batch_indices, epoch_order, eval_batches, make_train_transform
from adaptsoup.core.decoding import (
    INTERPOLATIONS, MAX_ASPECT_RATIO, MAX_DECODED_PIXELS, UnreadableImage, decode_image, decode_images, read_rgb,
    resize_center_crop,
)
from adaptsoup.core.image_set import ImageSet
from adaptsoup.core.preprocess import Preprocess
from adaptsoup.core.scanning import (
    IMAGE_SUFFIXES, UNDECODED_SUFFIXES, all_skipped, check_folder, none_readable, relative_name, scan_folder,
    scan_images, scan_labeled, scan_labeled_folder, shown_path,
)

__all__ = [
    # this module: folders -> ImageSet, with the on-disk cache
    "ENV_CACHE", "ProgressLike", "default_cache_dir", "load_folder",
    # scanning
    "IMAGE_SUFFIXES", "UNDECODED_SUFFIXES", "all_skipped", "check_folder", "none_readable", "relative_name",
    "scan_folder", "scan_images", "scan_labeled", "scan_labeled_folder", "shown_path",
    # decoding
    "INTERPOLATIONS", "MAX_ASPECT_RATIO", "MAX_DECODED_PIXELS", "UnreadableImage", "decode_image", "decode_images",
    "read_rgb", "resize_center_crop",
    # preprocessing, the decoded set, batches
    "Preprocess", "ImageSet",
    "AUGMENTATIONS", "augment_batch", "batch_indices", "epoch_order", "eval_batches", "make_train_transform",
]

ENV_CACHE = "ADAPTSOUP_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "adaptsoup")


def load_folder(
    root: str | os.PathLike,
    preprocess: Preprocess,
    *,
    labeled: bool = False,
    class_names: Sequence[str] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: "ProgressLike | None" = None,
    description: str | None = None,
) -> ImageSet:
    """Scan and decode a folder (labeled ImageFolder layout or not) into an :class:`ImageSet`.

    The decoded tensor is cached under ``cache_dir`` keyed by the file list, sizes, modification times and
    preprocessing, so a second run over the same folder skips decoding.
    """
    root = check_folder(root, "labeled folder" if labeled else "image folder")
    if labeled:
        paths, labels, names, others = scan_labeled_folder(root, class_names)
    else:
        (paths, others), labels, names = scan_folder(root), None, list(class_names or [])
    key = _cache_key(root, paths, preprocess, labels)
    cache_file = Path(cache_dir or default_cache_dir()) / "images" / f"{key}.pt"
    if cache and cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            return _image_set_from_blob(blob, root, names, others)
        except Exception:  # noqa: BLE001 - a bad cache entry is rebuilt, never fatal
            pass
    task = None
    if progress is not None:
        task = progress.add_task(description or f"decode {root.name}", total=len(paths))
    images, kept, skipped = decode_images(
        paths, preprocess, on_progress=(lambda n: progress.advance(task, n)) if progress is not None else None
    )
    if progress is not None:
        progress.remove_task(task)
    if not kept:
        raise none_readable(root, len(paths))
    kept_labels = None if labels is None else torch.tensor([labels[i] for i in kept], dtype=torch.long)
    rel_paths = [relative_name(paths[i], root) for i in kept]
    blob = {"images": images, "paths": rel_paths, "labels": kept_labels, "skipped": [list(s) for s in skipped]}
    if cache:
        from adaptsoup.core.io import atomic_path

        try:
            with atomic_path(cache_file) as tmp:
                torch.save(blob, tmp)
        except OSError:
            pass
    return _image_set_from_blob(blob, root, names, others)


def _image_set_from_blob(blob: dict, root: Path, names: list[str], others: list[tuple[str, str]]) -> ImageSet:
    """The cached decode plus the entries that are not images (scanned afresh: they are not in the cache key)."""
    return ImageSet(
        images=blob["images"],
        paths=list(blob["paths"]),
        labels=blob["labels"],
        class_names=names,
        skipped=all_skipped(others, [(str(s[0]), str(s[1])) for s in blob["skipped"]]),
        root=shown_path(root),
    )


def _cache_key(root: Path, paths: Sequence[Path], preprocess: Preprocess, labels: Sequence[int] | None) -> str:
    digest = hashlib.sha256()
    digest.update(repr((str(root.resolve()), preprocess, labels is not None)).encode("utf-8", "surrogateescape"))
    for p, label in zip(paths, labels if labels is not None else [None] * len(paths)):
        st = p.stat()
        digest.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


class ProgressLike:  # pragma: no cover - structural type of rich.progress.Progress
    def add_task(self, description: str, total: int | None = None) -> int: ...
    def advance(self, task: int, advance: float = 1) -> None: ...
    def remove_task(self, task: int) -> None: ...
