"""CIFAR-10-C corruptions at 32 px: deterministic, well-formed, stronger with severity."""

from __future__ import annotations

import numpy as np
import pytest

from adaptsoup_bench.corruptions import CORRUPTIONS, FAMILIES, PARAMS, corrupt32, corrupt_batch, image_seed


@pytest.fixture(scope="module")
def images():
    # smooth images with structure (gradients and a square) so blurs and noise both show
    yy, xx = np.mgrid[0:32, 0:32]
    base = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.float64)
    base[8:24, 8:24] = [220, 40, 40]
    return np.stack([np.clip(base + s * 7, 0, 255).astype(np.uint8) for s in range(3)])


def test_fifteen_corruptions_in_four_families():
    assert len(CORRUPTIONS) == 15 and set(CORRUPTIONS) == set(PARAMS)
    assert sorted(c for f in FAMILIES.values() for c in f) == sorted(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_uint8_and_changes_the_image(images, name):
    a = corrupt_batch(images, name, 5)
    b = corrupt_batch(images, name, 5)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - images).mean() > 0.5
    # the seed depends on the image index: the same image at another index gets other noise
    if name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        assert not np.array_equal(corrupt32(images[0], name, 5, image_seed(name, 5, 0)), corrupt32(images[0], name, 5, image_seed(name, 5, 1)))


# CIFAR-10-C's elastic transform has its largest affine warp at severity 1, and pixelation's error on
# smooth images depends on how the box grid falls: their strength is not a pixel-difference ordering.
@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c not in ("elastic_transform", "pixelate")])
def test_severity_five_is_at_least_as_strong_as_one(images, name):
    d1 = np.abs(corrupt_batch(images, name, 1).astype(int) - images).mean()
    d5 = np.abs(corrupt_batch(images, name, 5).astype(int) - images).mean()
    assert d5 >= d1 * 0.9


def test_global_numpy_rng_is_left_alone(images):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt32(images[0], "gaussian_noise", 3, seed=5)
    assert np.random.rand() == expected


def test_bad_arguments():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt32(img, "rain", 3, 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt32(img, "fog", 6, 0)


# -- the shifts held out of every choice: CIFAR-10-C's four extra corruptions, six LAION-C-style distortions ------

from adaptsoup_bench.corruptions import ALL_SHIFTS, UNSEEN  # noqa: E402
from adaptsoup_bench.corruptions_extra import EXTRA_CORRUPTIONS, saturate, speckle_noise  # noqa: E402
from adaptsoup_bench.distortions import DISTORTIONS, luminance_checkerboard, mosaic, vertical_lines  # noqa: E402


def test_unseen_shifts_are_ten_and_disjoint_from_the_benchmark():
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert len(DISTORTIONS) == 6 and len(UNSEEN) == 10
    assert not set(UNSEEN) & set(CORRUPTIONS) and set(ALL_SHIFTS) == set(CORRUPTIONS) | set(UNSEEN)


@pytest.mark.parametrize("name", UNSEEN)
@pytest.mark.parametrize("severity", [1, 5])
def test_unseen_deterministic_uint8_and_changes_the_image(images, name, severity):
    a = corrupt_batch(images, name, severity)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, corrupt_batch(images, name, severity))
    assert np.abs(a.astype(int) - images).mean() > 0.1


@pytest.mark.parametrize("name", ["speckle_noise", "gaussian_blur", "mosaic", "stickers", "vertical_lines", "geometric_shapes",
                                  "luminance_checkerboard"])
def test_unseen_severity_five_is_stronger_than_one(images, name):
    d1 = np.abs(corrupt_batch(images, name, 1).astype(int) - images).mean()
    d5 = np.abs(corrupt_batch(images, name, 5).astype(int) - images).mean()
    assert d5 > d1


def test_unseen_closed_forms(images):
    x = images[0]
    # saturation scaled by 0 leaves grey: every channel equal to the HSV value (max channel)
    grey = saturate(x, (0.0, 0.0), 0)
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 0], x.max(axis=-1))
    # speckle of a black image stays black (the noise is multiplicative)
    assert np.all(speckle_noise(np.zeros_like(x), 0.2, 0) == 0)
    # a mosaic at weight 0 is the image; each tile at weight 1 keeps its mean colour
    assert np.allclose(mosaic(x, (4, 0.0), 0), x)
    mid = x // 8 + 100  # no tile clips
    full = mosaic(mid, (4, 1.0), 0)
    assert np.allclose(full[4:8, 8:12].mean(axis=(0, 1)), mid[4:8, 8:12].mean(axis=(0, 1)), atol=1e-9)
    assert not np.allclose(full, mid)
    # vertical lines paint whole columns: every changed pixel's column is changed top to bottom
    np.random.seed(0)
    lined = vertical_lines(x, (0.25, 1.0), 0)
    changed = np.any(lined != x, axis=(0, 2))
    assert 0 < changed.sum() <= 8
    # the checkerboard at amplitude 0 is the image
    np.random.seed(0)
    assert np.allclose(luminance_checkerboard(x, (4, 0.0), 0), x, atol=1e-6)
