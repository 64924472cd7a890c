"""One checkpoint reader and one writer, used everywhere.

adaptsoup writes **safetensors** files whose metadata holds a JSON :class:`CheckpointMeta` (architecture,
classes, preprocessing, provenance).  It reads those, plus plain PyTorch state dicts (``.pt``, ``.pth``,
``.bin``) through ``torch.load(weights_only=True)`` so that an untrusted pickle cannot run code, and timm's
own sources (a ``save_for_hf`` folder, ``local-dir:PATH``, ``hf-hub:ORG/NAME`` from the local cache; see
:mod:`adaptsoup.core.sources`), whose ``config.json`` becomes the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

if TYPE_CHECKING:
    import torch  # imported where tensors are read or written: `adaptsoup info` and the CLI's errors stay light

from adaptsoup.errors import CheckpointError
from adaptsoup.core.io import atomic_path
from adaptsoup.core.sources import CONFIG, WEIGHTS, resolve_model_source

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


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, imported on first use (it imports torch)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def load_file(filename: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, imported on first use."""
    from safetensors.torch import load_file as read

    return read(filename)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointMeta | None]:
    """Read a checkpoint file or timm folder (any model source): its tensors (keys normalised) and metadata if present."""
    path = resolve_model_source(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return read_timm_folder(path)
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


def read_timm_folder(folder: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """A ``save_for_hf`` folder: its weights, and metadata from its ``config.json`` (architecture, model
    arguments, classes and the preprocessing of its ``pretrained_cfg``)."""
    try:
        config = json.loads((folder / CONFIG).read_text())
        arch = config["architecture"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder / CONFIG} is not a timm model config ({type(exc).__name__}: {exc})") from None
    weights = next(folder / name for name in WEIGHTS if (folder / name).is_file())
    state_dict, _ = read_checkpoint(weights)
    pcfg = dict(config.get("pretrained_cfg") or {})
    kwargs = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    names = config.get("label_names") or pcfg.get("label_names") or []
    if isinstance(names, dict):  # {class index: name}
        names = [names[k] for k in sorted(names, key=int)]
    default = CheckpointMeta(arch=arch, num_classes=0)
    meta = CheckpointMeta(
        arch=arch, num_classes=int(config.get("num_classes", pcfg.get("num_classes", 0)) or 0), class_names=list(names),
        input_size=tuple(pcfg.get("input_size") or default.input_size), mean=tuple(pcfg.get("mean") or default.mean),
        std=tuple(pcfg.get("std") or default.std), interpolation=str(pcfg.get("interpolation") or default.interpolation),
        crop_pct=float(pcfg.get("crop_pct") or default.crop_pct), model_kwargs=kwargs,
        provenance={"source": str(folder), "pretrained_tag": pcfg.get("tag")},
    )
    return state_dict, meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta | None]:
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return normalise_state_dict(state_dict), read_meta(path)


def _read_torch(path: Path) -> Any:
    import torch

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
    import torch

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
    return {new: tensors[old] for new, old in normalised_keys(list(tensors)).items()}


def normalised_keys(keys: list[str]) -> dict[str, str]:
    """``{normalised key: stored key}``: each of ``module.``, ``model.``, ``_orig_mod.`` (in turn) stripped when every key has it."""
    names = {k: k for k in keys}
    for prefix in STRIP_PREFIXES:
        if names and all(k.startswith(prefix) for k in names):
            names = {k[len(prefix):]: old for k, old in names.items()}
    return names


def _is_tensor_dict(obj: dict) -> bool:
    import torch

    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def safetensors_summary(path: str | os.PathLike) -> tuple[int, int, CheckpointMeta | None]:
    """(tensors, parameters, metadata) of a safetensors file from its header alone: no tensor is read and
    torch is not imported, so ``adaptsoup info`` answers at once."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(path.stat().st_size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(handle.read(size))
        metadata = header.pop("__metadata__", None) or {}
        shapes = [entry["shape"] for entry in header.values()]
        params = sum(_product(shape) for shape in shapes)
        meta = CheckpointMeta.from_json(metadata[META_KEY]) if META_KEY in metadata else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {type(exc).__name__}: {str(exc)[:120]}") from None
    return len(shapes), params, meta


def _product(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
