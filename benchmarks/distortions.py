"""LAION-C-style synthetic distortions at 32 px, for shifts no recipe or decision rule was chosen on.

LAION-C (Li et al., ICML 2025) distorts 224-px web images six ways at five intensities: glitched,
mosaic, stickers, vertical_lines, geometric_shapes, luminance_checkerboard.  Its generator is not shipped
here, so these are this project's own 32-px renderings of the same six ideas (what each one does is in
its docstring); they are *like* LAION-C in kind (overlays and rearrangements rather than the sensor and
weather degradations of CIFAR-10-C), not LAION-C itself.  A real LAION-C tree is run with
``bench imagenet-c``.  Each function takes a uint8 ``[H, W, 3]`` image, its intensity's parameters and a
seed, and draws from NumPy's global RNG, which :func:`adaptsoup_bench.corruptions.corrupt32` seeds per image.
"""

from __future__ import annotations

import cv2
import numpy as np
import skimage as sk

DISTORTION_PARAMS = {
    # (horizontal bands moved, largest shift in px, red/blue channel offset in px)
    "glitched": [(2, 2, 0), (3, 3, 1), (4, 4, 1), (6, 6, 2), (8, 8, 2)],
    # (tile size in px, weight of the tile's thumbnail against the original tile)
    "mosaic": [(8, 0.3), (8, 0.45), (4, 0.6), (4, 0.75), (4, 0.9)],
    # (stickers, side in px)
    "stickers": [(1, 6), (2, 7), (3, 8), (4, 9), (5, 10)],
    # (fraction of columns painted, opacity)
    "vertical_lines": [(0.06, 0.8), (0.12, 0.8), (0.19, 0.85), (0.25, 0.9), (0.34, 0.9)],
    # (shapes, opacity)
    "geometric_shapes": [(1, 0.85), (2, 0.85), (3, 0.85), (5, 0.9), (7, 0.9)],
    # (checker cell in px, luminance amplitude: cells are scaled by 1 ± amplitude)
    "luminance_checkerboard": [(8, 0.2), (8, 0.3), (4, 0.4), (4, 0.5), (4, 0.6)],
}


def glitched(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Digital glitch: random horizontal bands shifted sideways (wrapping), then red and blue pulled apart."""
    bands, shift, offset = c
    out = x.copy()
    h = x.shape[0]
    for _ in range(bands):
        top = np.random.randint(0, h - 1)
        height = np.random.randint(1, max(2, h // 6) + 1)
        out[top : top + height] = np.roll(out[top : top + height], np.random.randint(-shift, shift + 1), axis=1)
    if offset:
        out[..., 0] = np.roll(out[..., 0], offset, axis=1)
        out[..., 2] = np.roll(out[..., 2], -offset, axis=1)
    return out


def mosaic(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Photo-mosaic: every tile becomes a thumbnail of the whole image recoloured to the tile's mean colour,
    blended with the original tile (the larger the weight, the less of the original survives)."""
    tile, weight = c
    image = x.astype(np.float64) / 255.0
    thumb = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
    thumb = thumb - thumb.mean(axis=(0, 1))
    out = image.copy()
    for top in range(0, x.shape[0], tile):
        for left in range(0, x.shape[1], tile):
            cell = image[top : top + tile, left : left + tile]
            rendered = thumb[: cell.shape[0], : cell.shape[1]] + cell.mean(axis=(0, 1))
            out[top : top + tile, left : left + tile] = weight * rendered + (1 - weight) * cell
    return np.clip(out, 0, 1) * 255


def stickers(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Opaque stickers: squares or discs of a saturated two-colour stripe pattern pasted at random places."""
    count, side = c
    out = x.astype(np.float64)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(count):
        top, left = np.random.randint(0, x.shape[0] - side + 1), np.random.randint(0, x.shape[1] - side + 1)
        colours = sk.color.hsv2rgb(np.array([[[np.random.rand(), 0.9, 0.95], [np.random.rand(), 0.9, 0.6]]]))[0] * 255
        period = np.random.randint(2, 5)
        pattern = np.where((((xx + yy) // period) % 2)[..., None] == 0, colours[0], colours[1])
        mask = np.ones((side, side), bool) if np.random.rand() < 0.5 else (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
        region = out[top : top + side, left : left + side]
        region[mask] = pattern[mask]
    return out


def vertical_lines(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """One-pixel vertical lines of random colours over a fraction of the columns."""
    fraction, opacity = c
    out = x.astype(np.float64)
    width = x.shape[1]
    columns = np.random.choice(width, size=max(1, int(round(fraction * width))), replace=False)
    colours = np.random.randint(0, 256, size=(len(columns), 3))
    out[:, columns] = (1 - opacity) * out[:, columns] + opacity * colours[None, :, :]
    return out


def geometric_shapes(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Filled circles, rectangles and triangles of random colours and sizes, drawn semi-opaque."""
    count, opacity = c
    out = x.astype(np.float64)
    h, w = x.shape[:2]
    for _ in range(count):
        layer = np.zeros((h, w), np.uint8)
        kind = np.random.randint(3)
        size = np.random.randint(h // 5, h // 2 + 1)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        if kind == 0:
            cv2.circle(layer, (int(cx), int(cy)), int(size // 2), 1, -1)
        elif kind == 1:
            cv2.rectangle(layer, (int(cx - size // 2), int(cy - size // 3)), (int(cx + size // 2), int(cy + size // 3)), 1, -1)
        else:
            points = np.array([[cx, cy - size // 2], [cx - size // 2, cy + size // 2], [cx + size // 2, cy + size // 2]], np.int32)
            cv2.fillPoly(layer, [points], 1)
        colour = np.random.randint(0, 256, size=3)
        mask = layer.astype(bool)
        out[mask] = (1 - opacity) * out[mask] + opacity * colour
    return out


def luminance_checkerboard(x: np.ndarray, c: tuple, seed: int) -> np.ndarray:
    """Brightness alternately raised and lowered in the cells of a checkerboard (at a random phase)."""
    cell, amplitude = c
    h, w = x.shape[:2]
    dy, dx = np.random.randint(0, cell, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    sign = np.where((((yy + dy) // cell + (xx + dx) // cell) % 2) == 0, 1.0, -1.0)
    hsv = sk.color.rgb2hsv(x / 255.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] * (1 + amplitude * sign), 0, 1)
    return np.clip(sk.color.hsv2rgb(hsv), 0, 1) * 255


DISTORTION_FUNCS = {"glitched": glitched, "mosaic": mosaic, "stickers": stickers, "vertical_lines": vertical_lines,
                    "geometric_shapes": geometric_shapes, "luminance_checkerboard": luminance_checkerboard}
DISTORTIONS = tuple(DISTORTION_FUNCS)
