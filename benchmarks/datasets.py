"""Where benchmark data lives: CIFAR-10 from ``ADAPTSOUP_DATA``, a user's path, or ``../shared/datasets``.

The JPEG tarball is unpacked once into the cache folder (outside the repository); nothing is downloaded.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from adaptsoup.core.data import default_cache_dir
from adaptsoup.errors import DataError
from adaptsoup.core.io import atomic_path

ENV_DATA = "ADAPTSOUP_DATA"
CIFAR10_TARBALL = "cifar10-jpeg.tar.gz"
def default_stock_path() -> Path:
    """The CIFAR-10 reference stock shipped with the project (trained by benchmarks/train_stock.py)."""
    return Path(__file__).resolve().parent / "stock" / "vit_tiny_patch4_32_cifar10.safetensors"


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _candidate_dirs(explicit: str | os.PathLike | None) -> list[Path]:
    out = []
    if explicit:
        out.append(Path(explicit).expanduser())
    if os.environ.get(ENV_DATA):
        out.append(Path(os.environ[ENV_DATA]).expanduser())
    here = Path(__file__).resolve().parent.parent
    out.append(here.parent / "shared" / "datasets" / "cifar10")
    out.append(Path.cwd().parent / "shared" / "datasets" / "cifar10")
    return out


def find_cifar10(path: str | os.PathLike | None = None) -> Path | None:
    """A folder holding ``train/<class>`` and ``test/<class>`` (unpacking the tarball if that is what is found)."""
    for cand in _candidate_dirs(path):
        for base in (cand, cand / "cifar10"):
            if (base / "train").is_dir() and (base / "test").is_dir():
                return base
            if (base / CIFAR10_TARBALL).is_file():
                return unpack_cifar10(base / CIFAR10_TARBALL)
            if base.is_file() and base.name.endswith(".tar.gz"):
                return unpack_cifar10(base)
    return None


def require_cifar10(path: str | os.PathLike | None = None) -> Path:
    root = find_cifar10(path)
    if root is None:
        raise DataError(
            f"CIFAR-10 not found: pass --data PATH or set {ENV_DATA} to a folder with {CIFAR10_TARBALL} "
            "(or with train/ and test/ class folders)"
        )
    return root


def unpack_cifar10(tarball: Path) -> Path:
    dest = default_cache_dir() / "datasets" / "cifar10"
    marker = dest / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(tarball.stat().st_size):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not m.name.startswith(("/", "..")) and ".." not in m.name]
        tar.extractall(dest, members=members, filter="data")
    # the archive may hold a top-level folder
    if not (dest / "train").is_dir():
        inner = [p for p in dest.iterdir() if p.is_dir() and (p / "train").is_dir()]
        if not inner:
            raise DataError(f"{tarball} does not hold train/ and test/ folders")
        for sub in ("train", "test"):
            (inner[0] / sub).rename(dest / sub)
    with atomic_path(marker) as tmp:
        tmp.write_text(str(tarball.stat().st_size))
    return dest


CALIBRATION_SEED = 1  # the permutation of CIFAR-10's training images that int8 calibration draws from


def calibration_split(count: int, calibration: int, check: int = 0, seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets of ``count`` images: ``calibration`` images for static int8 calibration (the first of a
    seeded permutation; ``benchmarks/deploy_speed.py`` calibrates on them) and the next ``check`` ones, to
    compare calibrations on images none of them was calibrated on."""
    if calibration + check > count:
        raise SystemExit(f"{calibration} + {check} images asked, the folder holds {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    return order[:calibration], order[calibration : calibration + check]
