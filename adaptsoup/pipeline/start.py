"""Where each training run of ``adapt`` starts: the protocol.

* ``deployed`` (no ``pretrained`` in the recipe): every inter-training and every vanilla fine-tuning starts
  from the deployed model itself, an already fine-tuned classifier.
* ``pretrained`` (the paper's, and the authors' released code: "We use MAE's encoder (for the stock) and
  decoder"): they start from the pre-trained checkpoint the deployed model was fine-tuned from, e.g. its MAE
  encoder, in the deployed model's architecture and classes with the head zeroed (LP-FT's linear probe
  sets it), so self and vanilla ingredients alike are LP-FT fine-tunes of their own encoders.

Fine-tuning back always starts from the ingredient's own inter-trained encoder.  The deployed model gives
the classes, the preprocessing and the ``deployed`` evaluation row under both protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adaptsoup.core.models import load_model, with_pretrained_encoder
from adaptsoup.core.run_dir import RunDir
from adaptsoup.pipeline.plan import InterRun
from adaptsoup.pipeline.recipe import AdaptConfig

PROTOCOLS = ("deployed", "pretrained")


@dataclass(frozen=True)
class StartPoint:
    """A checkpoint a training run starts from.  ``arch`` only for a checkpoint without adaptsoup metadata;
    ``pretrained``: an encoder without a trained head, loaded into the deployed model's architecture."""

    path: Path
    arch: str | None
    pretrained: bool = False


def protocol(cfg: AdaptConfig) -> str:
    """``"pretrained"`` (ingredients start from a pre-trained encoder, the paper's) or ``"deployed"``."""
    return "pretrained" if cfg.pretrained else "deployed"


def start_checkpoint(cfg: AdaptConfig, run_dir: RunDir, inter: InterRun | None = None) -> StartPoint:
    """Where a training run starts: fine-tuning back from its inter-trained encoder ``inter``; inter-training
    and vanilla fine-tuning (``inter`` None) from the pre-trained checkpoint, or else the deployed model."""
    if inter is not None:
        return StartPoint(run_dir.inter(inter.name), arch=None)
    if cfg.pretrained:
        return StartPoint(Path(cfg.pretrained), cfg.arch, pretrained=True)
    return StartPoint(Path(cfg.model), cfg.arch)


def load_start(cfg: AdaptConfig, start: StartPoint) -> nn.Module:
    """The model a training run starts from (a pre-trained encoder inside the deployed model's architecture)."""
    if not start.pretrained:
        return load_model(start.arch, start.path)
    return with_pretrained_encoder(load_model(cfg.arch, cfg.model), start.path)


def probe_parent(cfg: AdaptConfig, inter: InterRun | None) -> str:
    """The name the linear probe of LP-FT is cached under: one probe per encoder fine-tuned from."""
    if inter is not None:
        return inter.name
    return "pretrained" if cfg.pretrained else "stock"
