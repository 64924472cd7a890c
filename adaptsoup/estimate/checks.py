"""Input checks shared by the estimators (one-line :class:`AdaptsoupError` messages) and the softmax they use.

Every estimator works in float64: logits are cast once here, so sums over thousands of images do not lose
the last digits that a closed-form test (or a 0.1-point decision) looks at.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adaptsoup.errors import AdaptsoupError


def as_logits(logits: torch.Tensor, what: str, num_classes: int | None = None) -> torch.Tensor:
    """``logits`` as a float64 ``[N, C]`` tensor with N >= 1, finite, and C == ``num_classes`` when given."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AdaptsoupError(f"{what}: expected logits of shape [images, classes], got {shape}")
    if logits.shape[0] == 0:
        raise AdaptsoupError(f"{what}: no images (empty logits)")
    if logits.shape[1] < 2:
        raise AdaptsoupError(f"{what}: a classifier needs at least 2 classes, got {logits.shape[1]}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise AdaptsoupError(f"{what}: {logits.shape[1]} classes, but {num_classes} expected (the models must share their classes)")
    logits = logits.detach().to(torch.float64)
    if not torch.isfinite(logits).all():
        raise AdaptsoupError(f"{what}: logits hold NaN or infinite values")
    return logits


def as_labels(labels: torch.Tensor | Sequence[int], count: int, num_classes: int) -> torch.Tensor:
    """Validation labels as int64 ``[count]``, each in ``[0, num_classes)``."""
    labels = torch.as_tensor(labels).detach()
    if labels.dim() != 1 or labels.shape[0] != count:
        raise AdaptsoupError(f"validation labels: expected {count} labels (one per validation image), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise AdaptsoupError("validation labels: expected integer class indices")
    labels = labels.to(torch.int64)
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise AdaptsoupError(f"validation labels: class indices must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return labels


def check_single(target_logits: torch.Tensor, validation_logits: torch.Tensor, validation_labels
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One model's target logits, validation logits and labels, checked and cast (float64, int64)."""
    validation = as_logits(validation_logits, "validation")
    target = as_logits(target_logits, "target", num_classes=validation.shape[1])
    labels = as_labels(validation_labels, validation.shape[0], validation.shape[1])
    return target, validation, labels


def check_models(target_logits: Mapping[str, torch.Tensor], validation_logits: Mapping[str, torch.Tensor], validation_labels
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Several models' logits, keyed by model name: the same models, images and classes everywhere."""
    if not target_logits:
        raise AdaptsoupError("no models to estimate")
    if set(target_logits) != set(validation_logits):
        missing = sorted(set(target_logits) ^ set(validation_logits))
        raise AdaptsoupError(f"every model needs both target and validation logits; unmatched: {', '.join(missing)}")
    names = list(target_logits)
    first = names[0]
    validation = {n: as_logits(validation_logits[n], f"validation logits of {n}") for n in names}
    num_classes = validation[first].shape[1]
    target, counts = {}, {}
    for n in names:
        validation[n] = as_logits(validation[n], f"validation logits of {n}", num_classes=num_classes)
        target[n] = as_logits(target_logits[n], f"target logits of {n}", num_classes=num_classes)
        counts[n] = (target[n].shape[0], validation[n].shape[0])
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{n}: {t} target / {v} validation" for n, (t, v) in counts.items())
        raise AdaptsoupError(f"the models were run on different images ({shown})")
    labels = as_labels(validation_labels, validation[first].shape[0], num_classes)
    return target, validation, labels


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64."""
    return torch.softmax(logits.to(torch.float64) / temperature, dim=1)
