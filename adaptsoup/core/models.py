"""Models: adaptsoup's small CPU-scale ViTs (registered with timm) and the one model loader.

Everything is built with ``pretrained=False``: adaptsoup never downloads weights.  Weights come from a
local file through :mod:`adaptsoup.core.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from adaptsoup.core.checkpoint import CheckpointMeta, read_checkpoint
from adaptsoup.errors import CheckpointError, ModelError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Keys of an MAE checkpoint that belong to the pre-training decoder, not to the encoder.
MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_pico_patch4_32.untrained": _cfg(),
        "vit_mini_patch4_32.untrained": _cfg(),
        "vit_tiny_patch4_32.untrained": _cfg(),
        "vit_small_patch4_32.untrained": _cfg(),
    }
)

# Architectures for 32x32 inputs with 4x4 patches (an 8x8 grid of 64 patch tokens plus a class token).
SMALL_VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_pico_patch4_32": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),  # tests (~30k params)
    "vit_mini_patch4_32": dict(embed_dim=96, depth=4, num_heads=3),  # embedded demo (~0.45M)
    "vit_tiny_patch4_32": dict(embed_dim=192, depth=6, num_heads=3),  # CIFAR-10 reference stock (~2.7M)
    "vit_small_patch4_32": dict(embed_dim=384, depth=6, num_heads=6),  # ~10.7M
}


def _create_small_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ModelError(f"{variant} has no downloadable weights; pass a local checkpoint instead")
    args = dict(img_size=32, patch_size=4, **SMALL_VIT_ARCHS[variant])
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs)
    )


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Pico/4 for 32x32 inputs: 32 wide, 2 blocks. For tests."""
    return _create_small_vit("vit_pico_patch4_32", pretrained, **kwargs)


@register_model
def vit_mini_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Mini/4 for 32x32 inputs: 96 wide, 4 blocks. The embedded demo's deployed model."""
    return _create_small_vit("vit_mini_patch4_32", pretrained, **kwargs)


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny/4 for 32x32 inputs: 192 wide, 6 blocks. The CIFAR-10 reference stock."""
    return _create_small_vit("vit_tiny_patch4_32", pretrained, **kwargs)


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Small/4 for 32x32 inputs: 384 wide, 6 blocks."""
    return _create_small_vit("vit_small_patch4_32", pretrained, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Building and loading


def create_model(arch: str, num_classes: int | None = None, **model_kwargs: Any) -> nn.Module:
    """Build a timm model by name, never touching the network."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (did you mean one of: {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown architecture {arch!r}{hint}")
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(arch, pretrained=False, **kwargs)


def load_model(
    arch: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    *,
    reset_head: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Build ``arch`` and load ``checkpoint`` into it.

    ``arch``, ``num_classes`` and the preprocessing default to what an adaptsoup checkpoint's metadata
    says.  Other checkpoints (``.pt``/``.pth``/``.bin`` state dicts, wrapped or prefixed) need ``arch``.
    ``reset_head=True`` drops a classifier head whose shape does not fit (for a new task); otherwise any
    missing, unexpected or mis-shaped key is an error that lists them.

    The returned model carries ``pretrained_cfg`` (input size, mean, std, ``label_names``) that
    :func:`model_meta` turns back into checkpoint metadata.
    """
    meta = None
    state_dict = None
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(checkpoint)
    if arch is None:
        if meta is None:
            raise CheckpointError(f"{checkpoint} carries no adaptsoup metadata: name its architecture (--arch)")
        arch = meta.arch
    if meta is not None and arch == meta.arch:
        model_kwargs = {**meta.model_kwargs, **model_kwargs}
    if num_classes is None:
        if meta is not None:
            num_classes = meta.num_classes
    model = create_model(arch, num_classes=num_classes, **model_kwargs)
    if num_classes is None and state_dict is not None and not reset_head:
        found = _classes_in_state_dict(model, encoder_state_dict(state_dict))
        if found is not None and found != getattr(model, "num_classes", found):
            model = create_model(arch, num_classes=found, **model_kwargs)
    if state_dict is not None:
        state_dict = encoder_state_dict(state_dict)
        if isinstance(model, VisionTransformer):
            state_dict = checkpoint_filter_fn(state_dict, model)
        if reset_head:
            state_dict = _drop_mismatched_head(state_dict, model)
        load_state_dict_strict(model, state_dict, source=str(checkpoint))
    if meta is not None:
        apply_meta(model, meta)
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture=arch, num_classes=getattr(model, "num_classes", None))
    if reset_head and meta is not None and len(meta.class_names) != getattr(model, "num_classes", 0):
        model.pretrained_cfg["label_names"] = None
        model.adaptsoup_meta = dataclasses.replace(meta, num_classes=model.num_classes, class_names=[])
    model.eval()
    return model


def with_pretrained_encoder(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """``model`` (architecture, classes, preprocessing, metadata kept) carrying the encoder weights of a
    pre-trained ``checkpoint``, with its classifier head zeroed for a linear probe to set.

    The checkpoint's own head (absent, untrained or of another class count) and its MAE decoder keys are
    dropped; every other key must fit ``model`` (a one-line error lists the ones that do not).
    """
    source = load_model(model_arch(model), checkpoint, num_classes=getattr(model, "num_classes", None), reset_head=True)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    state.update({k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.startswith("head.")})
    load_state_dict_strict(model, state, source=f"pre-trained checkpoint {checkpoint}")
    return model


def _classes_in_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count of a plain state dict, read off the weight of ``model``'s classifier."""
    if not hasattr(model, "get_classifier"):
        return None
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            weight = state_dict.get(f"{name}.weight")
            if weight is not None and weight.ndim >= 1:
                return int(weight.shape[0])
    return None


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop MAE decoder keys (and ``mask_token``, which timm would take for a DINOv2 checkpoint)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(MAE_DECODER_PREFIXES)}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict`` with an error that names the first few offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit {model_arch(model)}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _drop_mismatched_head(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep the model's own (fresh) head wherever the checkpoint's head is missing or of another shape."""
    out = dict(state_dict)
    for key, value in model.state_dict().items():
        if key.startswith("head.") and (key not in out or out[key].shape != value.shape):
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Metadata


def model_arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def class_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    num_classes = getattr(model, "num_classes", 0)
    if names and len(names) == num_classes:
        return list(names)
    return [str(i) for i in range(num_classes)]


def apply_meta(model: nn.Module, meta: CheckpointMeta) -> None:
    """Make ``model.pretrained_cfg`` carry the checkpoint's preprocessing and class names."""
    model.pretrained_cfg = dict(
        getattr(model, "pretrained_cfg", {}) or {},
        architecture=meta.arch,
        input_size=tuple(meta.input_size),
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        interpolation=meta.interpolation,
        crop_pct=meta.crop_pct,
        label_names=list(meta.class_names) or None,
        num_classes=meta.num_classes,
    )
    model.adaptsoup_meta = meta


def model_meta(model: nn.Module, **provenance: Any) -> CheckpointMeta:
    """Checkpoint metadata describing ``model`` (its arch, classes and preprocessing)."""
    data_cfg = resolve_data_config({}, model=model)
    base = getattr(model, "adaptsoup_meta", None)
    return CheckpointMeta(
        arch=model_arch(model),
        num_classes=int(getattr(model, "num_classes", 0)),
        class_names=class_names(model),
        input_size=tuple(data_cfg["input_size"]),
        mean=tuple(float(x) for x in data_cfg["mean"]),
        std=tuple(float(x) for x in data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bicubic")),
        crop_pct=float(data_cfg.get("crop_pct", 1.0)),
        model_kwargs=dict(base.model_kwargs) if base is not None else {},
        provenance=provenance or (dict(base.provenance) if base is not None else {}),
    )


def set_class_names(model: nn.Module, names: list[str]) -> None:
    if len(names) != getattr(model, "num_classes", len(names)):
        raise ModelError(f"{len(names)} class names for a model with {model.num_classes} classes")
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=list(names))
    meta = getattr(model, "adaptsoup_meta", None)
    if meta is not None:
        model.adaptsoup_meta = dataclasses.replace(meta, class_names=list(names))


def require_vit(model: nn.Module, purpose: str = "this operation") -> VisionTransformer:
    """Refuse anything that is not a timm VisionTransformer with absolute position-embedded patch tokens."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"{purpose} needs a timm VisionTransformer with patch tokens; {model_arch(model)} "
            f"is a {type(model).__name__}"
        )
    if getattr(model, "pos_embed", None) is None:
        raise ModelError(f"{purpose} needs a ViT with an absolute position embedding; {model_arch(model)} has none")
    if getattr(model, "dynamic_img_size", False):
        raise ModelError(f"{purpose} does not support dynamic_img_size ViTs ({model_arch(model)})")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

