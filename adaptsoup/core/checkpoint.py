"""One checkpoint reader and one writer, used everywhere.

adaptsoup writes **safetensors** files whose metadata holds a JSON :class:`CheckpointMeta` (architecture,
classes, preprocessing, provenance).  It reads those, plus plain PyTorch state dicts (``.pt``, ``.pth``,
``.bin``) through ``torch.load(weights_only=True)`` so that an untrusted pickle cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptsoup.errors import CheckpointError
from adaptsoup.core.io import atomic_path

META_KEY = "adaptsoup"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict", "ema", "model_ema")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class CheckpointMeta:
    """What a deployed model needs besides its tensors."""

    arch: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("input_size", "mean", "std"):
            if key in raw and raw[key] is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    def with_provenance(self, **provenance: Any) -> "CheckpointMeta":
        return dataclasses.replace(self, provenance=provenance)


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta | None) -> Path:
    """Write ``state_dict`` (and ``meta``) atomically as safetensors."""
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"adaptsoup writes .safetensors checkpoints, not {path.suffix or 'no suffix'}: {path}")
    tensors = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu")
        # safetensors refuses tensors that share storage (tied weights): give each its own copy.
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[key] = tensor.contiguous()
    metadata = {META_KEY: meta.to_json()} if meta is not None else {}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointMeta | None]:
    """Read a checkpoint file: its tensors (keys normalised) and adaptsoup metadata if present."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a folder: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return normalise_state_dict(_read_torch(path)), None
    raise CheckpointError(
        f"unknown checkpoint format {path.suffix!r} for {path}: use .safetensors, or a state dict in .pt/.pth/.bin"
    )


def read_meta(path: str | os.PathLike) -> CheckpointMeta | None:
    """The metadata of a safetensors checkpoint, without reading its tensors."""
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return CheckpointMeta.from_json(metadata[META_KEY]) if META_KEY in metadata else None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta | None]:
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return normalise_state_dict(state_dict), read_meta(path)


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user-facing error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {path}: it is not a plain tensor state dict ({first_line[:200]}). "
            "adaptsoup only loads weights_only checkpoints; convert it to .safetensors"
        ) from None


def normalise_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Unwrap common containers (``state_dict``, ``model``, ...) and strip ``module.``/``model.`` prefixes."""
    for _ in range(4):
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)
