"""The run directory of ``adapt``: where each artefact lives, and its log.

Written by :mod:`adaptsoup.pipeline`, read by ``mix``, ``interpolate`` and the benchmarks::

    manifest.json           resolved recipe, environment, data, per-run records, soups, metrics, timings
    adapt.log               what happened, in order
    inter/<run>.safetensors inter-trained encoders; beside them the decoder warm-ups, projection heads and probes
    ingredients/<name>.safetensors
    state/<run>.pt          resume files of training runs that were cut off
    soup.safetensors        the Self-Soup (uniform)
    soups/<name>.safetensors  the supervised soup and the mixed soups
    tta/                    test-time adaptation of a soup
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Names of models in the manifest's metrics and soups.
SOUP = "soup"
SUPERVISED_SOUP = "supervised_soup"
DEPLOYED = "deployed"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def log(self) -> Path:
        return self.root / "adapt.log"

    @property
    def tta(self) -> Path:
        return self.root / "tta"

    def create(self) -> "RunDir":
        for sub in ("inter", "ingredients", "state", "soups"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    def inter(self, name: str) -> Path:
        """An inter-trained encoder (or a file beside it: ``name`` with a suffix such as ``.heads``)."""
        return self.root / "inter" / f"{name}.safetensors"

    def ingredient(self, name: str) -> Path:
        return self.root / "ingredients" / f"{name}.safetensors"

    def state(self, name: str) -> Path:
        """The resume file of the training run ``name``."""
        return self.root / "state" / f"{name}.pt"

    def soup(self, name: str = SOUP) -> Path:
        return self.root / "soup.safetensors" if name == SOUP else self.root / "soups" / f"{name}.safetensors"

    def probe(self, parent: str) -> Path:
        """The linear-probe head of ``parent`` (an inter-training run, or ``stock``), shared by its fine-tunings."""
        return self.inter(f"{parent}.probe")

    def heads(self, run: str) -> Path:
        """MoCo v3 / MMCR projection heads after their warm-up."""
        return self.inter(f"{run}.heads")

    def decoder_warmup(self, origin: str, depth: int, mask_ratio: float) -> Path:
        """A warmed-up MAE decoder (``origin`` stock or fresh), shared by the runs of one depth and mask ratio."""
        return self.inter(f"decoder_warmup_{origin}_d{depth}_m{int(mask_ratio * 100)}")

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))


class RunLog:
    """Timestamped lines to the run's ``adapt.log`` and, through ``echo``, to the console (``path`` None:
    the console only, as on the ranks other than 0 of a data-parallel run, which log nothing)."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        if self.echo is not None:
            self.echo(line)
