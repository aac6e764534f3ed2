"""Canny edge maps with numpy, so the ControlNet example needs no OpenCV.

The steps are the classic ones (Sobel gradients, non-maximum suppression, hysteresis) and the
thresholds are on the same scale as ``cv2.Canny`` (3x3 Sobel on 0-255 intensities, L1 magnitude),
so the ``cv2.Canny(image, 100, 200)`` of the ``lllyasviel/sd-controlnet-canny`` model card carries
over as ``canny(image, 100, 200)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Neighbours across the edge for each quantised gradient direction (row, column offsets):
# 0 deg (horizontal gradient), 45 deg, 90 deg (vertical), 135 deg; rows grow downwards.
_ACROSS = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}


def _shifted(padded: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """The unpadded window of a 1-pixel-padded array, moved by (dr, dc)."""
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    return padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="edge")
    gx = sum(k * (_shifted(p, dr, 1) - _shifted(p, dr, -1)) for dr, k in ((-1, 1), (0, 2), (1, 1)))
    gy = sum(k * (_shifted(p, 1, dc) - _shifted(p, -1, dc)) for dc, k in ((-1, 1), (0, 2), (1, 1)))
    return gx, gy


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep a pixel only where it peaks across the edge.

    Ties go to the first pixel of a plateau (strictly above the one before, at least the one
    after), so a sharp step gives a one-pixel line, not two.
    """
    direction = ((np.degrees(np.arctan2(gy, gx)) % 180 + 22.5) // 45).astype(int) % 4
    padded = np.pad(magnitude, 1)
    keep = np.zeros(magnitude.shape, dtype=bool)
    for d, (dr, dc) in _ACROSS.items():
        peak = (magnitude > _shifted(padded, -dr, -dc)) & (magnitude >= _shifted(padded, dr, dc))
        keep |= (direction == d) & peak
    return np.where(keep, magnitude, 0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels that are 8-connected, through weak pixels, to a strong one."""
    edges = strong
    while True:
        padded = np.pad(edges, 1)
        grown = weak & np.logical_or.reduce([_shifted(padded, dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """White-on-black RGB edge map of ``image``; ``low``/``high`` are the hysteresis thresholds."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = _sobel(gray)
    magnitude = _thin(np.abs(gx) + np.abs(gy), gx, gy)
    edges = _hysteresis(strong=magnitude >= high, weak=magnitude >= low)
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")
