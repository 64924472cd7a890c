"""Decoding one image file: to 8-bit RGB whatever its mode (grayscale, palette, alpha, CMYK, 16-bit), with
absurd sizes refused before any pixel is decoded (decompression bombs), then resized to the model's input
(timm's eval transform).  A file that cannot be decoded raises :class:`UnreadableImage`: a folder skips and
counts it, never fatal.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adaptsoup.core.preprocess import Preprocess
from adaptsoup.core.scanning import shown_path

# Refused before decoding: images whose decoded size or shape is absurd (a 500,000 x 1 PNG is 1.5 KB on disk, but
# resizing its short side to the model's input would take gigabytes).
MAX_DECODED_PIXELS = 2**27  # ~134 megapixels (an 11,585 x 11,585 image)
MAX_ASPECT_RATIO = 100.0


class UnreadableImage(Exception):
    """A file that is not a decodable image; the message says why (skipped and counted, never fatal)."""


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


INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


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
