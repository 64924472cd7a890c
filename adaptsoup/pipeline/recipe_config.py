"""The typed configuration of an ``adapt`` run: :class:`AdaptConfig` and its sections (inter-training,
fine-tuning back, the MoCo v3 and MMCR grids), with their defaults.

The defaults are the paper's (Self-Soupervision, §4): MAE inter-training with AdamW (wd 0.01, 10% warm-up,
cosine, batch 128) at learning rates {1e-5, 2e-5, 3e-5, 4e-5}; fine-tuning back on source with LP-FT at
{6e-5, 8e-5, 1e-4, 1.5e-4} and 3-Augment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe_values import build_typed, shown_value


@dataclass
class MoCoV3Grid:
    """MoCo v3 grid axes (besides the shared learning rates, steps and seeds)."""

    temperatures: list[float] = field(default_factory=lambda: [0.2])
    batch_sizes: list[int] = field(default_factory=lambda: [0])  # 0: the inter-training batch size


@dataclass
class MMCRGrid:
    """MMCR grid axes: λ = 0 is global-only, λ > 0 global+local; ``views`` augmentations per image."""

    lambdas: list[float] = field(default_factory=lambda: [0.0])
    views: int = 4


@dataclass
class InterTrainConfig:
    """Self-supervised inter-training (no labels).  List-valued fields are grid axes: M = their product,
    summed over the algorithms in ``ssl``."""

    ssl: list[str] = field(default_factory=lambda: ["mae"])
    lrs: list[float] = field(default_factory=lambda: [1e-5, 2e-5, 3e-5, 4e-5])
    mask_ratios: list[float] = field(default_factory=lambda: [0.75])
    decoder_depths: list[int] = field(default_factory=lambda: [0])  # 0: sized for the encoder
    steps: list[int] = field(default_factory=lambda: [0])  # 0: derived from ``epochs``
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: float = 10.0
    batch_size: int = 128
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    augment: str = "crop-flip"
    norm_pix_loss: bool = True
    decoder_warmup_steps: int = 200
    decoder_warmup_lr: float = 1e-3
    # Warm up the stock's MAE decoder too (encoder frozen) before the encoder moves: that decoder was trained
    # with the encoder *before* fine-tuning, so without it the first steps' gradients reach the fine-tuned
    # encoder through a mismatched decoder. Off by default (the paper starts from the decoder as it is).
    decoder_warmup_loaded: bool = False
    data: str = "target"  # "target" (Self-Soupervision) or "source" (continued SSL baseline)
    contrastive_augment: str = "3a"  # views of MoCo v3 and MMCR
    head_warmup_frac: float = 0.01  # MoCo v3 / MMCR: heads alone first, for this fraction of the steps
    mocov3: MoCoV3Grid = field(default_factory=MoCoV3Grid)
    mmcr: MMCRGrid = field(default_factory=MMCRGrid)
    noise_stage: str | None = None  # before_inter, before_finetune or before_mix
    noise_multipliers: list[float] = field(default_factory=lambda: [0.0])  # grid axis: x the stock's per-tensor std
    partitions: int = 0  # > 0: inter-train one ingredient per partition of the labeled source classes
    partition_mode: str = "range"  # range (class-index ranges) or random
    partition_loss: str = "mae"  # mae (no labels) or supervised


@dataclass
class FineTuneConfig:
    """Fine-tuning back on labeled source data, LP-FT.  ``lrs`` x ``seeds`` = N fine-tunings per encoder."""

    lrs: list[float] = field(default_factory=lambda: [6e-5, 8e-5, 1e-4, 1.5e-4])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: float = 10.0
    steps: int = 0  # 0: derived from ``epochs``
    batch_size: int = 128
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    augment: str = "3a"
    label_smoothing: float = 0.1
    probe_weight_decay: float = 1e-4


@dataclass
class AdaptConfig:
    """Everything an ``adapt`` run needs; written to the manifest as the resolved recipe."""

    model: str = ""
    target: str = ""
    source: str = ""
    out: str = ""
    stock: str | None = None  # MAE pre-trained checkpoint holding a decoder
    # The paper's protocol: every inter-training and every vanilla fine-tuning starts from this pre-trained
    # (not fine-tuned) checkpoint's encoder, in the deployed model's architecture and classes, with its head
    # dropped (LP-FT sets it); its MAE decoder, if it holds one, is used instead of ``stock``'s. None: the
    # deployed model (``model``) is inter-trained and fine-tuned, as before.
    pretrained: str | None = None
    arch: str | None = None
    evals: list[str] = field(default_factory=list)
    # Labeled in-distribution images none of the models trained on, for the label-free estimates and the
    # deploy recommendation every run ends with (adaptsoup.pipeline.recommend).  Without it, this many
    # source images (seeded, class-balanced) are held out of every fine-tuning instead; 0 with no
    # ``validation``: no estimates.  Held-out source images the deployed model itself trained on make its
    # estimates optimistic (the recommendation then leans to keeping it).
    validation: str | None = None
    validation_holdout: int = 1000
    vanilla: int = 0
    mix: list[str] = field(default_factory=list)  # mixing methods run after the soups; TTA adapts the last one's soup
    mix_labeled: str | None = None  # a few labeled images, for the mixing methods that need them
    tta: str | None = None  # sar or tent: test-time adaptation of the soup over the target
    tta_batch_size: int = 64
    tta_base_lr: float | None = None  # per 64 images; default: the method's reference
    tta_guard: bool = False  # reset the adapting soup when its predictions drift (adaptsoup.tta.guard)
    max_source_images: int = 0  # 0: all
    max_target_images: int = 0
    seed: int = 0
    device: str = "cpu"
    # Training precision: auto (each kind of training run times its own step in fp32, bf16 and bf16 with the
    # MATH attention kernel, and keeps the fastest; bf16 on CUDA where supported), fp32 or bf16.  Evaluation,
    # linear probes and mixing run in bf16 only when bf16 is asked for.  adaptsoup.train.precision
    precision: str = "auto"
    checkpoint_every_s: float = 120.0
    finetune_back: bool = True  # False: the inter-trained encoders are the ingredients (label-free soups)
    # Without fine-tuning back under the pretrained protocol, each ingredient is the deployed model plus this
    # multiple of its inter-training's task vector (inter-trained − pretrained): adaptsoup.soup.task_vector.
    task_vector_scale: float = 1.0
    inter: InterTrainConfig = field(default_factory=InterTrainConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "AdaptConfig":
        """A typed recipe from a dict (a recipe file, flags, a manifest): every value is checked against its
        field's type, with the key's path in the message (``inter.lrs[0]: expected a number, got 'x'``)."""
        if isinstance(raw, dict) and "bf16" in raw:  # the older spelling of precision (recipes and manifests before 0.2)
            raw = dict(raw)
            legacy = raw.pop("bf16")
            if not isinstance(legacy, bool):
                raise AdaptsoupError(f"bf16: expected true or false, got {shown_value(legacy)}")
            if raw.get("precision") not in (None, "bf16" if legacy else "fp32"):
                raise AdaptsoupError(f"bf16 = {str(legacy).lower()} contradicts precision = {raw['precision']!r}")
            raw["precision"] = "bf16" if legacy else "fp32"
        return build_typed(cls, raw, "")
