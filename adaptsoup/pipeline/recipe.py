"""Recipes: the resolved configuration of an ``adapt`` run (defaults < config file < command-line flags).

The defaults are the paper's (Self-Soupervision, §4): MAE inter-training with AdamW (wd 0.01, 10% warm-up,
cosine, batch 128) at learning rates {1e-5, 2e-5, 3e-5, 4e-5}; fine-tuning back on source with LP-FT at
{6e-5, 8e-5, 1e-4, 1.5e-4} and 3-Augment.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from adaptsoup.errors import AdaptsoupError


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
                raise AdaptsoupError(f"bf16: expected true or false, got {_shown(legacy)}")
            if raw.get("precision") not in (None, "bf16" if legacy else "fp32"):
                raise AdaptsoupError(f"bf16 = {str(legacy).lower()} contradicts precision = {raw['precision']!r}")
            raw["precision"] = "bf16" if legacy else "fp32"
        return _build(cls, raw, "")


_SECTIONS = frozenset({"InterTrainConfig", "FineTuneConfig", "MoCoV3Grid", "MMCRGrid"})  # nested tables


def _build(cls, raw: Any, section: str):
    if not isinstance(raw, dict):
        what = f"[{section}]" if section else "a recipe"
        raise AdaptsoupError(f"{what} must be a table of settings (key = value), got {_shown(raw)}")
    known = {f.name: f for f in fields(cls)}
    unknown = [str(k) for k in raw if k not in known]
    if unknown:
        where = f"[{section}] " if section else ""
        raise AdaptsoupError(f"unknown recipe key(s) {where}{', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    obj = cls()
    for key, value in raw.items():
        path = f"{section}.{key}" if section else key
        kind = str(known[key].type).replace(" ", "")
        if kind in _SECTIONS:
            setattr(obj, key, _build(type(getattr(obj, key)), {} if value is None else value, path))
        else:
            setattr(obj, key, _typed(value, kind, path))
    return obj


def _typed(value: Any, kind: str, path: str) -> Any:
    """``value`` as the annotation ``kind`` says (int, float, bool, str, their lists, ``X | None``), or an error."""
    if kind.endswith("|None"):
        return None if value is None else _typed(value, kind.removesuffix("|None"), path)
    if not kind.startswith("list["):
        return _scalar(value, kind, path)
    item = kind[len("list["):-1]
    if isinstance(value, str):  # "1e-5, 2e-5": a comma-separated list
        parts = [part.strip() for part in value.split(",") if part.strip()]
        return [_scalar(_parsed(part, item, f"{path}[{i}]"), item, f"{path}[{i}]") for i, part in enumerate(parts)]
    values = value if isinstance(value, list) else [value]
    return [_scalar(v, item, f"{path}[{i}]") for i, v in enumerate(values)]


def _parsed(text: str, kind: str, path: str) -> Any:
    try:
        return _SCALARS[kind](text)
    except ValueError:
        raise AdaptsoupError(f"{path}: expected {_NAMES[kind]}, got {_shown(text)}") from None


def _scalar(value: Any, kind: str, path: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise AdaptsoupError(f"{path}: expected {_NAMES[kind]}, got {_shown(value)}")
    return float(value) if kind == "float" else value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def with_overrides(cfg, overrides: dict[str, Any]):
    """``cfg`` with every override that is not None set on it (a mode's defaults, then the user's flags)."""
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(cfg, key):
                raise AdaptsoupError(f"unknown setting {key!r} for {type(cfg).__name__}")
            setattr(cfg, key, value)
    return cfg


def parse_settings(assignments: list[str], *classes, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """``["inter_steps=500", "inter_lrs=1e-5,2e-5"]`` as typed overrides of the fields of the dataclasses
    ``classes`` (int, float, bool, str, their lists — comma-separated — and optional forms: ``none`` for None).
    ``reserved`` maps settings that have their own flag to that flag."""
    reserved = reserved or {}
    fields = {f.name: str(f.type) for cls in reversed(classes) for f in dataclasses.fields(cls)
              if _settable(str(f.type)) and f.name not in reserved}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if key in reserved:
            raise AdaptsoupError(f"--set {key}: use {reserved[key]} instead")
        if not sep or key not in fields:
            known = ", ".join(sorted(fields))
            raise AdaptsoupError(f"--set wants KEY=VALUE with KEY one of: {known}; got {item!r}")
        kind = fields[key].replace(" ", "")
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if optional and text.lower() == "none":
            out[key] = None
            continue
        try:
            if kind.startswith("list["):
                scalar = _SCALARS[kind[len("list["):-1]]
                out[key] = [scalar(part.strip()) for part in text.split(",") if part.strip()]
            else:
                out[key] = _SCALARS[kind](text)
        except (KeyError, ValueError) as exc:
            raise AdaptsoupError(f"--set {key}: cannot read {text!r} as {fields[key]} ({exc})") from None
    return out


def _as_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_SCALARS = {"int": int, "float": float, "bool": _as_bool, "str": str}


def _settable(annotation: str) -> bool:
    kind = annotation.replace(" ", "").removesuffix("|None")
    return kind in _SCALARS or (kind.startswith("list[") and kind[len("list["):-1] in _SCALARS)


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) recipe as a dict."""
    path = Path(path)
    if not path.is_file():
        raise AdaptsoupError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parse errors of either format
        raise AdaptsoupError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    raise AdaptsoupError(f"recipe must be .toml, .yaml or .yml: {path}")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``None`` in ``override`` means "not given"."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


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
    from adaptsoup.core.data import AUGMENTATIONS

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
