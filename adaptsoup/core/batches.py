"""Batches from a decoded :class:`~adaptsoup.core.image_set.ImageSet`: the training order (a pure function of
seed and epoch, resumable at any step), training augmentations (timm's transforms, from the uint8 cache) and
normalised evaluation batches.
"""

from __future__ import annotations

from typing import Iterator

import torch
from PIL import Image

from adaptsoup.core.image_set import ImageSet
from adaptsoup.core.preprocess import Preprocess
from adaptsoup.errors import DataError


AUGMENTATIONS = ("none", "crop-flip", "3a")


def make_train_transform(preprocess: Preprocess, augment: str, crop_scale: tuple[float, float] = (0.35, 1.0)):
    """A per-image training transform (PIL -> normalised tensor) built from timm's transforms.

    ``3a`` is DeiT III's 3-Augment (timm ``auto_augment='3a'``); ``crop-flip`` is random resized crop and
    horizontal flip (MAE's pre-training augmentation); ``none`` only normalises.
    """
    from timm.data import create_transform

    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return None
    return create_transform(
        input_size=preprocess.size,
        is_training=True,
        scale=crop_scale,
        hflip=0.5,
        auto_augment="3a" if augment == "3a" else None,
        color_jitter=None if augment == "3a" else 0.0,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
        re_prob=0.0,
    )


def augment_batch(images_uint8: torch.Tensor, preprocess: Preprocess, transform) -> torch.Tensor:
    """Apply a per-image transform to a uint8 batch (or just normalise when ``transform`` is None)."""
    if transform is None:
        return preprocess.normalize(images_uint8)
    arrays = images_uint8.permute(0, 2, 3, 1).numpy()
    return torch.stack([transform(Image.fromarray(a)) for a in arrays])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The deterministic shuffled order of epoch ``epoch``: a pure function of (n, seed, epoch)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless stream of training batch indices (drop-last per epoch), resumable at ``start_step``."""
    if n == 0:
        raise DataError("no training images")
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        yield order[pos * batch_size : (pos + 1) * batch_size]
        step += 1


def eval_batches(images: ImageSet, preprocess: Preprocess, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, slice]]:
    for start in range(0, len(images), batch_size):
        sl = slice(start, min(start + batch_size, len(images)))
        yield preprocess.normalize(images.images[sl]), sl
