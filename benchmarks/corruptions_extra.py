"""CIFAR-10-C's four extra corruptions at 32 px: the ones Hendrycks & Dietterich (2019) kept out of the
benchmark for validation (speckle noise, Gaussian blur, spatter, saturate).

This project chooses every recipe and decision rule on the 15 benchmark corruptions; these four (with the
LAION-C-style distortions of :mod:`adaptsoup_bench.distortions`) are shifts no choice has seen.  The
parameters are the CIFAR-10-C release's 32-px ones (its ``make_cifar_c.py``: speckle σ .06–.2, blur σ
.4–1, spatter's water/mud settings, saturation scale 0.3 → 2.5).  Each function takes a uint8 ``[H, W, 3]``
image, its severity's parameters and a seed, and draws from NumPy's global RNG, which
:func:`adaptsoup_bench.corruptions.corrupt32` seeds per image.
"""

from __future__ import annotations

import cv2
import numpy as np
import skimage as sk
from skimage.filters import gaussian

EXTRA_PARAMS = {
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    # (liquid mean, liquid std, liquid blur σ, threshold, intensity or mud blur σ, 0 = water / 1 = mud)
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    "saturate": [(0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)],
}
WATER_RGB = np.array([175, 238, 238]) / 255.0  # pale turquoise
MUD_RGB = np.array([63, 42, 20]) / 255.0  # mud brown


def speckle_noise(x: np.ndarray, c: float, seed: int) -> np.ndarray:
    """Multiplicative Gaussian noise: x + x·N(0, c²)."""
    x = x / 255.0
    return np.clip(x + x * np.random.normal(size=x.shape, scale=c), 0, 1) * 255


def gaussian_blur(x: np.ndarray, c: float, seed: int) -> np.ndarray:
    return np.clip(gaussian(x / 255.0, sigma=c, channel_axis=-1), 0, 1) * 255


def spatter(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Water drops (severities 1–3: a bright, embossed liquid layer) or mud (4–5: opaque brown blots)."""
    x = x.astype(np.float32) / 255.0
    liquid = gaussian(np.random.normal(size=x.shape[:2], loc=c[0], scale=c[1]), sigma=c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        layer = (liquid * 255).astype(np.uint8)
        edges = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
        _, edges = cv2.threshold(edges, 20, 20, cv2.THRESH_TRUNC)
        edges = cv2.equalizeHist(cv2.blur(edges, (3, 3)).astype(np.uint8))
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
        edges = cv2.blur(cv2.filter2D(edges, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
        m = layer.astype(np.float32) * edges
        m = m / m.max() if m.max() > 0 else m
        return np.clip(x + (m * c[4])[..., None] * WATER_RGB, 0, 1) * 255
    m = gaussian((liquid > c[3]).astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    return np.clip(x * (1 - m[..., None]) + m[..., None] * MUD_RGB, 0, 1) * 255


def saturate(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    hsv = sk.color.rgb2hsv(x / 255.0)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(sk.color.hsv2rgb(hsv), 0, 1) * 255


EXTRA_FUNCS = {"speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate}
EXTRA_CORRUPTIONS = tuple(EXTRA_FUNCS)
