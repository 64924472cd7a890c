"""Builders shared by the tests: tiny models and image folders made on the fly (no downloads, no datasets)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import adaptsoup  # noqa: F401  (registers the small ViTs with timm)
from adaptsoup.core.checkpoint import CheckpointMeta
from adaptsoup.core.models import apply_meta, create_model

ARCH = "vit_pico_patch4_32"
CLASS_NAMES = ["cat", "dog", "bird"]
# Deliberately not the CIFAR defaults, so metadata that silently falls back to the defaults is caught.
MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.24, 0.26)


def tiny_model(num_classes: int = 3, seed: int = 0, class_names: list[str] | None = None) -> torch.nn.Module:
    """A seeded ``vit_pico_patch4_32`` carrying adaptsoup metadata (class names, preprocessing)."""
    torch.manual_seed(seed)
    model = create_model(ARCH, num_classes=num_classes)
    with torch.no_grad():
        # A larger head spreads the logits so that top-1 comparisons are not decided by float noise.
        model.head.weight.mul_(20.0)
        model.head.bias.normal_(0.0, 0.5)
    names = list(class_names) if class_names is not None else (CLASS_NAMES if num_classes == 3 else [f"c{i}" for i in range(num_classes)])
    apply_meta(
        model,
        CheckpointMeta(
            arch=ARCH, num_classes=num_classes, class_names=names, input_size=(3, 32, 32), mean=MEAN, std=STD,
            interpolation="bicubic", crop_pct=1.0, provenance={"made_by": "tests"},
        ),
    )
    return model.eval()


def random_batch(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def write_noise_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (32, 32), suffix: str = ".png") -> list[Path]:
    """``n`` random RGB images ``img_000.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


# The readable files of build_messy_folder, in the order load_folder must return them (sorted relative paths).
MESSY_GOOD = [
    "a_rgb.jpg",
    "b_gray.png",
    "c_palette.png",
    "d_rgba.png",
    "e_16bit.png",
    "f_cmyk.jpg",
    "sub/deeper/J_UPPER.PNG",
]
MESSY_BAD = ["g_truncated.jpg", "h_empty.jpg", "i_text.jpg"]


def build_messy_folder(root: Path) -> Path:
    """Every kind of file a real-world folder throws at the loader; see MESSY_GOOD / MESSY_BAD."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # A non-square RGB JPEG (exercises resize + centre crop).
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "a_rgb.jpg", quality=90)
    Image.new("L", (32, 32), 128).save(root / "b_gray.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.save(root / "c_palette.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "d_rgba.png")  # fully transparent red
    deep = np.full((32, 32), 65535, dtype=np.uint16)
    deep[:16] = 0
    Image.fromarray(deep).save(root / "e_16bit.png")  # mode I;16
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "f_cmyk.jpg", quality=95)  # red
    data = (root / "a_rgb.jpg").read_bytes()
    (root / "g_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "h_empty.jpg").write_bytes(b"")
    (root / "i_text.jpg").write_text("this is not a JPEG\n")
    nested = root / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(nested / "J_UPPER.PNG")
    (root / "notes.txt").write_text("not an image, must be ignored\n")
    return root


def build_labeled_folder(root: Path) -> Path:
    """``root/cat`` (2 images), ``root/dog`` (3, one nested), plus things that must be ignored."""
    write_noise_images(root / "cat", 2, seed=1)
    write_noise_images(root / "dog", 2, seed=2)
    write_noise_images(root / "dog" / "more", 1, seed=3)
    write_noise_images(root / ".hidden", 1, seed=4)  # hidden folder: not a class
    (root / "README.txt").write_text("a stray file at the top level\n")
    return root


def build_adapt_inputs(root: Path, per_class: int = 6, target: int = 12) -> Path:
    """A saved tiny stock plus ``root/source/<class>`` (labeled) and ``root/target`` (unlabeled); returns the stock."""
    from adaptsoup.core.checkpoint import save_checkpoint
    from adaptsoup.core.models import model_meta

    model = tiny_model()
    stock = save_checkpoint(root / "stock.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(root / "source" / name, per_class, seed=10 + i)
    write_noise_images(root / "target", target, seed=30)
    return stock


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` grayscale pixels (a decompression-bomb shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * min(width, 1 << 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))


NON_UTF8_NAME = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8 (a surrogate-escaped str)


def saved_model_and_labeled_stream(tmp_path: Path, per_class: int = 4) -> tuple[Path, Path]:
    """A tiny saved model (``tmp_path/m.safetensors``) and a labeled stream of noise images, ``per_class`` in each
    of its class folders (``tmp_path/stream/<class>/``)."""
    from adaptsoup.core.checkpoint import save_checkpoint
    from adaptsoup.core.models import model_meta

    model = tiny_model(seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), model_meta(model))
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "stream" / name, per_class, seed=i)
    return path, tmp_path / "stream"
