"""How decoded images become model inputs: timm's data config (input size, mean, std, crop, interpolation),
and normalisation of uint8 batches into float32 (in torch, or in numpy for onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: timm's data config (size, mean, std, crop, interpolation)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "Preprocess":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        _, h, w = cfg["input_size"]
        return cls(
            size=(int(h), int(w)),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
        )

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocess":
        """From a model's metadata (``input_size`` ``(3, H, W)``, ``mean``, ``std``, ``crop_pct``, ``interpolation``),
        e.g. what :func:`adaptsoup.deploy.runtime.read_onnx_metadata` returns."""
        _, h, w = meta["input_size"]
        return cls(size=(int(h), int(w)), mean=tuple(meta["mean"]), std=tuple(meta["std"]), crop_pct=meta["crop_pct"],
                   interpolation=meta["interpolation"])

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> normalised float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (images_uint8.float() - mean) / std

    def normalize_array(self, images_hwc: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` (as decoded) -> normalised float32 ``[B, 3, H, W]``: :meth:`normalize` in numpy,
        the same float32 arithmetic, for callers that need no torch tensors (onnxruntime)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        return (images_hwc.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std
