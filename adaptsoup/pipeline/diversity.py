"""Noisy soups and partition soups: two more ways to make ingredients differ.

* Parameter noise: Gaussian noise with std = multiplier × (the stock's std of that tensor), added to every
  floating-point tensor at one of three points — before inter-training, between inter-training and
  fine-tuning, or before mixing.  Multiplier 0 changes nothing.
* Partitions: the labeled source classes split into P disjoint groups, by class-index ranges (as the paper
  splits ImageNet's 1000 classes into 4 ranges) or at random; one ingredient is inter-trained per group.
"""

from __future__ import annotations

import zlib

import torch

NOISE_STAGES = ("before_inter", "before_finetune", "before_mix")
PARTITION_MODES = ("range", "random")


def tensor_stds(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor standard deviation of the floating-point tensors (0 for scalars)."""
    return {k: float(v.double().std()) if v.numel() > 1 else 0.0 for k, v in state.items() if v.is_floating_point()}


def add_parameter_noise(state: dict[str, torch.Tensor], multiplier: float, stds: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """θ + N(0, (multiplier · std_k)²) per float tensor k; other tensors (and multiplier 0) unchanged."""
    if multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {multiplier}")
    if multiplier == 0:
        return dict(state)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        std = stds.get(key, 0.0) * multiplier
        if value.is_floating_point() and std > 0:
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64) * std
            out[key] = (value.double() + noise).to(value.dtype)
        else:
            out[key] = value
    return out


def name_seed(name: str, seed: int = 0) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) & 0x7FFFFFFF


def class_partitions(num_classes: int, parts: int, mode: str = "range", seed: int = 0) -> list[list[int]]:
    """Split class indices 0..C-1 into ``parts`` disjoint groups covering all classes (sizes differ by ≤ 1)."""
    if not 1 <= parts <= num_classes:
        raise ValueError(f"cannot split {num_classes} classes into {parts} partitions")
    if mode not in PARTITION_MODES:
        raise ValueError(f"partition mode must be one of {', '.join(PARTITION_MODES)}, got {mode!r}")
    order = list(range(num_classes)) if mode == "range" else torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [round(i * num_classes / parts) for i in range(parts + 1)]
    return [sorted(order[bounds[i] : bounds[i + 1]]) for i in range(parts)]


def indices_of_classes(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return torch.nonzero(torch.isin(labels, torch.tensor(classes, dtype=labels.dtype)), as_tuple=False).flatten()
