"""The embedded demo data: scikit-learn's handwritten digits (shipped inside the package, no download).

1,797 8x8 grayscale digits are upscaled to 32x32 RGB.  A fixed split gives a labeled *source* set (for
training the demo's deployed model and for fine-tuning back) and a held-out part that is corrupted
(imagecorruptions, fixed seed per image) into the *shifted* target set.  Both are written in the
ImageFolder layout ``<root>/<digit>/<index>.png``; a target folder is read without its labels by adapt.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from adaptsoup.core.io import atomic_path

DIGIT_CLASSES = [str(i) for i in range(10)]
SOURCE_FRACTION = 0.6
SPLIT_SEED = 0
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast")
DEFAULT_SEVERITY = 3


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 ``[N, 32, 32, 3]`` and int labels ``[N]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((img / 16.0 * 255.0).round().astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB"))
        for img in data.images
    ])
    return images, data.target.astype(np.int64)


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    cut = int(round(SOURCE_FRACTION * n))
    return np.sort(order[:cut]), np.sort(order[cut:])


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One ImageNet-C corruption (imagecorruptions) with NumPy's global RNG seeded per image."""
    from imagecorruptions import corrupt

    state = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        out = corrupt(image, corruption_name=corruption, severity=severity)
    finally:
        np.random.set_state(state)
    return np.asarray(out, dtype=np.uint8)[: image.shape[0], : image.shape[1]]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for img, label, idx in zip(images, labels, indices):
        path = root / DIGIT_CLASSES[int(label)] / f"{int(idx):04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")


def make_digits_folders(out: str | os.PathLike, corruptions=DEFAULT_CORRUPTIONS, severity: int = DEFAULT_SEVERITY,
                        shifted_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``<out>/source`` (clean, labeled) and the shifted target (default ``<out>/shifted_images``).

    Held-out image ``k`` gets corruption ``corruptions[k % len(corruptions)]`` at ``severity``, seeded by its
    index, so the folders are the same on every machine.  Returns (source, shifted).
    """
    out = Path(out)
    source = out / "source"
    shifted = Path(shifted_dir) if shifted_dir else out / "shifted_images"
    marker = shifted / ".adaptsoup-digits"
    spec = f"{','.join(corruptions)}@{severity}"
    if (source / ".adaptsoup-digits").is_file() and marker.is_file() and marker.read_text() == spec:
        return source, shifted
    images, labels = digits_arrays()
    src_idx, held_idx = split_indices(len(labels))
    write_folder(source, images[src_idx], labels[src_idx], src_idx)
    (source / ".adaptsoup-digits").write_text("source")
    corrupted = np.stack([
        corrupt_image(images[i], corruptions[k % len(corruptions)], severity, seed=int(i)) for k, i in enumerate(held_idx)
    ])
    write_folder(shifted, corrupted, labels[held_idx], held_idx)
    marker.write_text(spec)
    return source, shifted
