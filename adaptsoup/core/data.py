"""Images: scanning folders, robust decoding, a uint8 tensor cache, batches and augmentations.

Folders are scanned recursively in sorted order.  Files that cannot be decoded are skipped and counted,
never fatal.  Decoded images are resized once to the model's input size (timm's data config: resize the
shorter side to ``size / crop_pct``, centre crop) and kept as one uint8 tensor ``[N, 3, H, W]``; training
augmentations (timm's transforms) and normalisation run from that cache, so decoding happens once.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adaptsoup.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
ENV_CACHE = "ADAPTSOUP_CACHE"
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass
class ImageSet:
    """Decoded images of one folder: ``images`` uint8 ``[N, 3, H, W]``; ``labels`` int64 ``[N]`` or None."""

    images: torch.Tensor
    paths: list[str]
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    root: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(
            images=self.images[idx],
            paths=[self.paths[i] for i in idx.tolist()],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            skipped=list(self.skipped),
            root=self.root,
        )

    def counts(self) -> dict[str, int]:
        return {"images": len(self), "skipped": len(self.skipped)}


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: timm's data config (size, mean, std, crop, interpolation)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "Preprocess":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        _, h, w = cfg["input_size"]
        return cls(
            size=(int(h), int(w)),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
        )

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocess":
        """From a model's metadata (``input_size`` ``(3, H, W)``, ``mean``, ``std``, ``crop_pct``, ``interpolation``),
        e.g. what :func:`adaptsoup.deploy.runtime.read_onnx_metadata` returns."""
        _, h, w = meta["input_size"]
        return cls(size=(int(h), int(w)), mean=tuple(meta["mean"]), std=tuple(meta["std"]), crop_pct=meta["crop_pct"],
                   interpolation=meta["interpolation"])

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> normalised float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (images_uint8.float() - mean) / std

    def normalize_array(self, images_hwc: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` (as decoded) -> normalised float32 ``[B, 3, H, W]``: :meth:`normalize` in numpy,
        the same float32 arithmetic, for callers that need no torch tensors (onnxruntime)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        return (images_hwc.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std


# --------------------------------------------------------------------------------------------------------------
# Scanning


def check_folder(root: str | os.PathLike, what: str = "image folder") -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{what} not found: {shown_path(root)}")
    if not root.is_dir():
        raise DataError(f"{what} must be a folder, got a file: {shown_path(root)}")
    return root


def scan_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive suffixes, sorted); error if none."""
    return scan_folder(root)[0]


def scan_folder(root: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``root`` (recursive, sorted) and the entries that look meant as images but are
    not ((path, "not an image (...)"): folders named ``x.jpg``, broken links, FIFOs, ``.svg``, ``.npy`` ...)."""
    root = check_folder(root)
    paths, others = _entries(root, root)
    if not paths:
        extra = f" ({len(others)} entries that are not images)" if others else ""
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {shown_path(root)}{extra}")
    return paths, others


# Suffixes of files that are images to a person but that the decoder does not read: counted as "not an image".
UNDECODED_SUFFIXES = frozenset({".svg", ".svgz", ".npy", ".npz", ".heic", ".heif", ".avif", ".jxl", ".psd", ".raw",
                                ".cr2", ".nef", ".arw", ".dng", ".exr", ".hdr", ".pdf", ".eps"})


def _entries(folder: Path, root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    images: list[Path] = []
    others: list[tuple[str, str]] = []
    for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        reason = _not_an_image(p)
        if reason is None:
            images.append(p)
        elif reason:
            others.append((shown_path(p), f"not an image ({reason})"))
    return images, others


def _not_an_image(p: Path) -> str | None:
    """None for an image file to decode; why an entry is not one; "" for entries ignored silently."""
    suffix = p.suffix.lower()
    if p.is_dir():
        return "a folder" if suffix in IMAGE_SUFFIXES else ""
    if p.is_file():
        if suffix in IMAGE_SUFFIXES:
            return None
        return f"{suffix} files are not decoded" if suffix in UNDECODED_SUFFIXES else ""
    if p.name.startswith("."):
        return ""
    return "a broken link" if p.is_symlink() else "not a regular file"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (surrogate escapes) become ``\\xNN``."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_labeled(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder layout ``root/<class_name>/...``: paths, label indices and class names.

    With ``class_names`` (the model's classes) every folder must name one of them; the label index is the
    position in ``class_names``.  Without, classes are the sorted sub-folder names.
    """
    paths, labels, names, _ = scan_labeled_folder(root, class_names)
    return paths, labels, names


def scan_labeled_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None
                        ) -> tuple[list[Path], list[int], list[str], list[tuple[str, str]]]:
    """:func:`scan_labeled`, plus the entries of the class folders that are not images (see :func:`scan_folder`)."""
    root = check_folder(root, "labeled folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"labeled folder {shown_path(root)} has no class sub-folders (expected {shown_path(root)}/<class_name>/<image>)")
    if class_names is None:
        class_names = folders
    else:
        class_names = list(class_names)
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            shown = ", ".join(shown_path(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(
                f"{shown_path(root)}: class folder(s) {shown} are not classes of the model "
                f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})"
            )
    index = {name: i for i, name in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    others: list[tuple[str, str]] = []
    for folder in folders:
        found, not_images = _entries(root / folder, root / folder)
        paths += found
        labels += [index[folder]] * len(found)
        others += not_images
    if not paths:
        raise DataError(f"no images found in the class folders of {shown_path(root)}")
    return paths, labels, list(class_names), others


# --------------------------------------------------------------------------------------------------------------
# Decoding


class UnreadableImage(Exception):
    pass


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode one image to 8-bit RGB (grayscale, palette, RGBA, CMYK and 16-bit handled)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                _check_decoded_size(img.size)  # from the header, before any pixel is decoded
                img.load()
                return _to_rgb8(img)
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, OverflowError, MemoryError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {str(exc)[:120]}") from None


# Refused before decoding: images whose decoded size or shape is absurd (a 500,000 x 1 PNG is 1.5 KB on disk, but
# resizing its short side to the model's input would take gigabytes).
MAX_DECODED_PIXELS = 2**27  # ~134 megapixels (an 11,585 x 11,585 image)
MAX_ASPECT_RATIO = 100.0


def _check_decoded_size(size: tuple[int, int]) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise UnreadableImage(f"empty image ({w}x{h})")
    if w * h > MAX_DECODED_PIXELS:
        raise UnreadableImage(f"too large to decode: {w}x{h} pixels (limit {MAX_DECODED_PIXELS:,})")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise UnreadableImage(f"absurd aspect ratio: {w}x{h} (limit {MAX_ASPECT_RATIO:g}:1)")


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    """timm's eval transform: resize the shorter side to ``size / crop_pct``, then centre crop ``size``."""
    h, w = size
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    resample = INTERPOLATIONS.get(interpolation, Image.Resampling.BICUBIC)
    if img.size != (w, h) or crop_pct != 1.0:
        iw, ih = img.size
        if h == w:
            ratio = scale_h / min(iw, ih)
            new = (max(w, round(iw * ratio)), max(h, round(ih * ratio)))
        else:
            new = (scale_w, scale_h)
        img = img.resize(new, resample)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        img = img.crop((left, top, left + w, top + h))
    return img


def decode_image(path: str | os.PathLike, preprocess: Preprocess) -> np.ndarray:
    """One image file as uint8 ``[H, W, 3]`` at the model's input size; raises :class:`UnreadableImage`."""
    img = resize_center_crop(read_rgb(path), preprocess.size, preprocess.crop_pct, preprocess.interpolation)
    return np.asarray(img, dtype=np.uint8)


def decode_images(
    paths: Sequence[Path],
    preprocess: Preprocess,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode ``paths`` into uint8 ``[N, 3, H, W]``; returns (images, kept indices, skipped (path, reason))."""
    h, w = preprocess.size
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            out[len(kept)] = decode_image(path, preprocess)
            kept.append(i)
        except UnreadableImage as exc:
            skipped.append((shown_path(path), str(exc)))
        if on_progress is not None:
            on_progress(1)
    images = torch.from_numpy(out[: len(kept)]).permute(0, 3, 1, 2).contiguous()
    return images, kept, skipped


# --------------------------------------------------------------------------------------------------------------
# Folders -> ImageSet (with an on-disk cache)


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


def relative_name(path: Path, root: Path) -> str:
    """How a decoded image is named in results: its path under the folder scanned, printable."""
    return shown_path(path.relative_to(root).as_posix())


def all_skipped(not_images: list[tuple[str, str]], unreadable: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A folder's skipped entries, as reported: the entries that are not images and the unreadable files, sorted."""
    return sorted(not_images + unreadable)


def none_readable(root: Path, count: int) -> DataError:
    return DataError(f"none of the {count} image files under {shown_path(root)} could be read")


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


# --------------------------------------------------------------------------------------------------------------
# Batches and augmentation


AUGMENTATIONS = ("none", "crop-flip", "3a")


def make_train_transform(preprocess: Preprocess, augment: str, crop_scale: tuple[float, float] = (0.35, 1.0)):
    """A per-image training transform (PIL -> normalised tensor) built from timm's transforms.

    ``3a`` is DeiT III's 3-Augment (timm ``auto_augment='3a'``); ``crop-flip`` is random resized crop and
    horizontal flip (MAE's pre-training augmentation); ``none`` only normalises.
    """
    from timm.data import create_transform

    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return None
    return create_transform(
        input_size=preprocess.size,
        is_training=True,
        scale=crop_scale,
        hflip=0.5,
        auto_augment="3a" if augment == "3a" else None,
        color_jitter=None if augment == "3a" else 0.0,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
        re_prob=0.0,
    )


def augment_batch(images_uint8: torch.Tensor, preprocess: Preprocess, transform) -> torch.Tensor:
    """Apply a per-image transform to a uint8 batch (or just normalise when ``transform`` is None)."""
    if transform is None:
        return preprocess.normalize(images_uint8)
    arrays = images_uint8.permute(0, 2, 3, 1).numpy()
    return torch.stack([transform(Image.fromarray(a)) for a in arrays])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The deterministic shuffled order of epoch ``epoch``: a pure function of (n, seed, epoch)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless stream of training batch indices (drop-last per epoch), resumable at ``start_step``."""
    if n == 0:
        raise DataError("no training images")
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        yield order[pos * batch_size : (pos + 1) * batch_size]
        step += 1


def eval_batches(images: ImageSet, preprocess: Preprocess, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, slice]]:
    for start in range(0, len(images), batch_size):
        sl = slice(start, min(start + batch_size, len(images)))
        yield preprocess.normalize(images.images[sl]), sl
