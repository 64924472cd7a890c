"""Refusing a recipe that cannot run, before any work is done: sizes, counts and rates in their ranges, known
losses, augmentations, mixing and test-time adaptation methods, the data each part needs, the device.
"""

from __future__ import annotations

from typing import Any

from adaptsoup.errors import AdaptsoupError
from adaptsoup.pipeline.recipe_config import AdaptConfig, InterTrainConfig


# The smallest value of each size, count and rate ("> 0": strictly positive); list values are checked item by item.
_AT_LEAST: dict[str, tuple[str, float]] = {
    "vanilla": (">=", 0), "max_source_images": (">=", 0), "max_target_images": (">=", 0), "seed": (">=", 0),
    "checkpoint_every_s": (">=", 0), "tta_batch_size": (">=", 1), "tta_base_lr": (">", 0),
    "inter.steps": (">=", 0), "inter.seeds": (">=", 0), "inter.decoder_depths": (">=", 0), "inter.epochs": (">", 0),
    "inter.batch_size": (">=", 1), "inter.weight_decay": (">=", 0), "inter.warmup_frac": (">=", 0),
    "inter.decoder_warmup_steps": (">=", 0), "inter.decoder_warmup_lr": (">", 0), "inter.head_warmup_frac": (">=", 0),
    "inter.partitions": (">=", 0), "inter.noise_multipliers": (">=", 0),
    "inter.mocov3.temperatures": (">", 0), "inter.mocov3.batch_sizes": (">=", 0),
    "inter.mmcr.lambdas": (">=", 0), "inter.mmcr.views": (">=", 2),
    "finetune.seeds": (">=", 0), "finetune.epochs": (">", 0), "finetune.steps": (">=", 0), "finetune.batch_size": (">=", 1),
    "finetune.weight_decay": (">=", 0), "finetune.warmup_frac": (">=", 0), "finetune.label_smoothing": (">=", 0),
    "finetune.probe_weight_decay": (">=", 0),
}
_FRACTIONS = ("inter.warmup_frac", "inter.head_warmup_frac", "finetune.warmup_frac", "finetune.label_smoothing")
_GRID_AXES = ("inter.lrs", "inter.mask_ratios", "inter.decoder_depths", "inter.steps", "inter.seeds", "inter.noise_multipliers",
              "inter.mocov3.temperatures", "inter.mocov3.batch_sizes", "inter.mmcr.lambdas", "finetune.lrs", "finetune.seeds")


def _at(cfg: AdaptConfig, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def validate_ranges(cfg: AdaptConfig) -> None:
    """Sizes, counts and rates in their ranges (non-positive batch sizes, negative steps ... refused), with the
    key's path in the message."""
    for path in _GRID_AXES:
        if not _at(cfg, path):
            raise AdaptsoupError(f"{path} is a grid axis and needs at least one value")
    for path, (op, bound) in _AT_LEAST.items():
        value = _at(cfg, path)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if not (v > bound if op == ">" else v >= bound):
                raise AdaptsoupError(f"{path} must be {op} {bound:g}, got {v!r}")
    for path in _FRACTIONS:
        if _at(cfg, path) >= 1:
            raise AdaptsoupError(f"{path} must be < 1, got {_at(cfg, path)!r}")


def validate(cfg: AdaptConfig) -> None:
    """Refuse a recipe that cannot run, before any work is done."""
    validate_ranges(cfg)
    _validate_inter(cfg.inter)
    for name, values in (("inter.lrs", cfg.inter.lrs), ("finetune.lrs", cfg.finetune.lrs)):
        if not values or any(float(v) <= 0 for v in values):
            raise AdaptsoupError(f"{name} must be a non-empty list of positive learning rates, got {values}")
    from adaptsoup.core.batches import AUGMENTATIONS

    for aug in (cfg.inter.augment, cfg.finetune.augment, cfg.inter.contrastive_augment):
        if aug not in AUGMENTATIONS:
            raise AdaptsoupError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if cfg.vanilla < 0:
        raise AdaptsoupError("--vanilla must be >= 0")
    if isinstance(cfg.validation_holdout, bool) or not isinstance(cfg.validation_holdout, int) or cfg.validation_holdout < 0:
        raise AdaptsoupError(f"validation_holdout must be a whole number >= 0, got {cfg.validation_holdout!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise AdaptsoupError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if not isinstance(cfg.task_vector_scale, (int, float)) or isinstance(cfg.task_vector_scale, bool) or not cfg.task_vector_scale > 0:
        raise AdaptsoupError(f"task_vector_scale must be a number > 0, got {cfg.task_vector_scale!r}")
    if cfg.pretrained:
        from adaptsoup.core.sources import resolve_model_source  # a file, a timm folder, local-dir: or hf-hub:

        if not resolve_model_source(cfg.pretrained).exists():
            raise AdaptsoupError(f"--pretrained checkpoint not found: {cfg.pretrained}")
    if not cfg.finetune_back and (cfg.vanilla or cfg.inter.partition_loss == "supervised" and cfg.inter.partitions):
        raise AdaptsoupError("without fine-tuning back there are no vanilla or supervised-partition ingredients")
    needs_source = cfg.finetune_back or cfg.inter.data == "source" or cfg.inter.partitions
    if needs_source and not cfg.source:
        raise AdaptsoupError("a labeled --source folder is needed (for fine-tuning back, or as inter-training data)")
    _validate_after_soups(cfg)
    _validate_device(cfg.device)


def _validate_inter(inter: InterTrainConfig) -> None:
    from adaptsoup.pipeline.diversity import NOISE_STAGES, PARTITION_MODES
    from adaptsoup.ssl.registry import SSL_LOSSES

    unknown = [a for a in inter.ssl if a not in SSL_LOSSES]
    if unknown or not inter.ssl:
        raise AdaptsoupError(f"unknown self-supervised loss {', '.join(unknown) or '(none)'}; available: {', '.join(SSL_LOSSES)}")
    if inter.noise_stage is not None and inter.noise_stage not in NOISE_STAGES:
        raise AdaptsoupError(f"noise_stage must be one of {', '.join(NOISE_STAGES)}, got {inter.noise_stage!r}")
    if any(float(m) < 0 for m in inter.noise_multipliers):
        raise AdaptsoupError(f"noise multipliers must be >= 0, got {inter.noise_multipliers}")
    if inter.partitions < 0 or inter.partition_mode not in PARTITION_MODES or inter.partition_loss not in ("mae", "supervised"):
        raise AdaptsoupError("partitions must be >= 0, partition_mode range or random, partition_loss mae or supervised")
    if inter.partitions and inter.partition_loss == "supervised" and inter.ssl != ["mae"]:
        raise AdaptsoupError("supervised partition inter-training replaces the SSL loss: use it with ssl = ['mae'] (the default)")
    if inter.mmcr.views < 2:
        raise AdaptsoupError("MMCR needs at least 2 views per image")
    if inter.data not in ("target", "source"):
        raise AdaptsoupError(f"inter.data must be 'target' or 'source', got {inter.data!r}")
    if any(not 0 <= float(r) < 1 for r in inter.mask_ratios):
        raise AdaptsoupError(f"mask ratios must be in [0, 1), got {inter.mask_ratios}")


def _validate_after_soups(cfg: AdaptConfig) -> None:
    """The ``mix`` methods exist and have the labels they need; ``tta`` is a known method."""
    from adaptsoup.soup import methods as mixing_methods
    from adaptsoup.tta.adapter import TTA_METHODS

    needing = [m for m in cfg.mix if mixing_methods.get(m).needs == "labels"]
    if needing and not cfg.mix_labeled:
        raise AdaptsoupError(f"mix {', '.join(needing)} needs a few labels: add --mix-labeled DIR (mix_labeled in a recipe)")
    if cfg.tta is not None and cfg.tta not in TTA_METHODS:
        raise AdaptsoupError(f"--tta must be one of {', '.join(TTA_METHODS)}, got {cfg.tta!r}")
    if cfg.tta_batch_size < 1:
        raise AdaptsoupError(f"tta_batch_size must be >= 1, got {cfg.tta_batch_size}")


def _validate_device(device: str) -> None:
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AdaptsoupError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AdaptsoupError("--device cuda was asked for but no CUDA device is available")
