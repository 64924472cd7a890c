"""CIFAR-10-C corruptions at 32 px (Hendrycks & Dietterich, 2019), generated deterministically.

imagecorruptions carries ImageNet-C's parameters, tuned for 224-px images; at 32 px several of them
(blurs, contrast, noise) leave almost nothing of the image.  This module applies the parameters the
CIFAR-10-C release used for 32-px images (its ``make_cifar_c.py``; summarised in ``shared/reference``),
reusing imagecorruptions' helpers (``disk``, ``plasma_fractal``, ``clipped_zoom``, its motion-blur kernel,
its frost textures and its compiled glass-blur shuffle).  Differences from the release: motion blur (and
the motion blur inside snow) use imagecorruptions' NumPy kernel instead of ImageMagick's, and fog's
fractal map is generated at 32 px.  Every image is corrupted with NumPy's global RNG seeded from
(corruption, severity, index), so the data set is the same on every machine.
"""

from __future__ import annotations

import importlib.resources
import zlib
from io import BytesIO

import cv2
import numpy as np
import skimage as sk
from imagecorruptions.corruptions import _motion_blur, _shuffle_pixels_njit_glass_blur, clipped_zoom, disk, plasma_fractal
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.filters import gaussian

from adaptsoup_bench.corruptions_extra import EXTRA_CORRUPTIONS, EXTRA_FUNCS, EXTRA_PARAMS
from adaptsoup_bench.distortions import DISTORTION_FUNCS, DISTORTION_PARAMS, DISTORTIONS

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}

# Severity 1..5 parameters of the CIFAR-10-C release (32 px).
PARAMS = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
# Shifts held out of every choice of recipe and decision rule: CIFAR-10-C's four extra (validation)
# corruptions and six LAION-C-style distortions (``bench c10c --corruptions unseen``).
UNSEEN = EXTRA_CORRUPTIONS + DISTORTIONS
ALL_SHIFTS = CORRUPTIONS + UNSEEN
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def image_seed(corruption: str, severity: int, index: int) -> int:
    return zlib.crc32(f"{corruption}/{severity}/{index}".encode()) & 0x7FFFFFFF


def corrupt32(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one uint8 ``[H, W, 3]`` image (CIFAR-10-C parameters) with a fixed seed; returns uint8."""
    if corruption not in _ALL_PARAMS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(ALL_SHIFTS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    c = _ALL_PARAMS[corruption][severity - 1]
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = _FUNCS[corruption](np.asarray(image, dtype=np.uint8), c, seed)
    finally:
        np.random.set_state(state)
    return np.clip(np.asarray(out, dtype=np.float64) + 0.5, 0, 255).astype(np.uint8)  # round like a PNG save


def _centre_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    out = clipped_zoom(img, factor)
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[top : top + h, left : left + w]


def _gaussian_noise(x, c, seed):
    x = x / 255.0
    return np.clip(x + np.random.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, c, seed):
    x = x / 255.0
    return np.clip(np.random.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, c, seed):
    return np.clip(sk.util.random_noise(x / 255.0, mode="s&p", amount=c, rng=seed), 0, 1) * 255


def _defocus_blur(x, c, seed):
    x = x / 255.0
    kernel = disk(radius=c[0], alias_blur=c[1])
    return np.clip(np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=2), 0, 1) * 255


def _glass_blur(x, c, seed):
    x = np.uint8(gaussian(x / 255.0, sigma=c[0], channel_axis=-1) * 255)
    x = _shuffle_pixels_njit_glass_blur(x.shape[0], x.shape[1], x, c, seed)
    return np.clip(gaussian(x / 255.0, sigma=c[0], channel_axis=-1), 0, 1) * 255


def _motion_blur32(x, c, seed):
    return np.clip(_motion_blur(x.astype(np.float32), radius=c[0], sigma=c[1], angle=np.random.uniform(-45, 45)), 0, 255)


def _zoom_blur(x, c, seed):
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for factor in c:
        out += _centre_zoom(x, factor)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def _snow(x, c, seed):
    x = x.astype(np.float32) / 255.0
    layer = np.random.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    layer = _centre_zoom(layer[..., np.newaxis], c[2])
    layer[layer < c[3]] = 0
    layer = np.clip(layer.squeeze(-1), 0, 1)
    layer = np.round(np.clip(layer, 0, 1) * 255) / 255.0  # the release passes the layer through an 8-bit PNG
    layer = _motion_blur(layer, radius=c[4], sigma=c[5], angle=np.random.uniform(-135, -45))[..., np.newaxis]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(x.shape[0], x.shape[1], 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def _frost(x, c, seed):
    name = FROST_FILES[np.random.randint(5)]
    with importlib.resources.as_file(importlib.resources.files("imagecorruptions") / "frost" / name) as path:
        frost = cv2.imread(str(path))
    frost = cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)
    h, w = x.shape[:2]
    top, left = np.random.randint(0, frost.shape[0] - h), np.random.randint(0, frost.shape[1] - w)
    frost = frost[top : top + h, left : left + w][..., [2, 1, 0]]
    return np.clip(c[0] * x + c[1] * frost, 0, 255)


def _fog(x, c, seed):
    x = x / 255.0
    max_val = x.max()
    size = _next_pow2(max(x.shape[:2]))
    x = x + c[0] * plasma_fractal(mapsize=size, wibbledecay=c[1])[: x.shape[0], : x.shape[1]][..., np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _brightness(x, c, seed):
    hsv = sk.color.rgb2hsv(x / 255.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return np.clip(sk.color.hsv2rgb(hsv), 0, 1) * 255


def _contrast(x, c, seed):
    x = x / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic(x, c, seed):
    size = x.shape[0]
    alpha, sigma, affine = c[0] * size, c[1] * size, c[2] * size
    image = x.astype(np.float32) / 255.0
    shape = image.shape
    centre = np.float32(shape[:2]) // 2
    square = min(shape[:2]) // 3
    pts1 = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    pts2 = pts1 + np.random.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(pts1, pts2), shape[:2][::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(np.random.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian(np.random.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    xs, ys, zs = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = (np.reshape(ys + dy[..., None], (-1, 1)), np.reshape(xs + dx[..., None], (-1, 1)), np.reshape(zs, (-1, 1)))
    return np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def _pixelate(x, c, seed):
    h, w = x.shape[:2]
    img = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX))


def _jpeg(x, c, seed):
    buffer = BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=c)
    return np.asarray(Image.open(buffer).convert("RGB"))


_FUNCS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur32, "zoom_blur": _zoom_blur,
    "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic, "pixelate": _pixelate, "jpeg_compression": _jpeg,
    **EXTRA_FUNCS, **DISTORTION_FUNCS,
}
_ALL_PARAMS = {**PARAMS, **EXTRA_PARAMS, **DISTORTION_PARAMS}


def corrupt_batch(images: np.ndarray, corruption: str, severity: int, indices=None) -> np.ndarray:
    """Corrupt uint8 ``[N, H, W, 3]`` images; image ``i`` is seeded by its index (``indices[i]`` if given)."""
    idx = range(len(images)) if indices is None else indices
    return np.stack([corrupt32(img, corruption, severity, image_seed(corruption, severity, int(i))) for img, i in zip(images, idx)])
