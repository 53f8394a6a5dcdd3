"""Pure image functions for OCT B-scans: PIL image or uint8 array in, numpy array out.

The whole-image resize policies of :mod:`anogan_lightning.data.bscan.crop` (the configs' default,
``resize=retina``, normalises the retina instead: :mod:`anogan_lightning.data.bscan.retina_windows`):

- ``crop``: :func:`fit_height` scales to a fixed height keeping the aspect ratio, giving a uint8
  strip (S, W'); :func:`crop_square` then cuts an (S, S) window from it, padding strips narrower
  than S symmetrically with the strip's minimum value (the dark background). Pixels keep their
  aspect and the output shape carries no trace of the scan's width.
- ``squash``: :func:`squash` resizes straight to (S, S), so a wide scan is compressed more than a
  narrow one and the width leaks into the anatomy's apparent shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR  # Pillow's resize is antialiased when shrinking


def _as_pil(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(img))
    return img


def _gray(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Grayscale ``img``, decoding a JPEG at a reduced DCT scale that is still >= ``size``."""
    if img.format == "JPEG":
        img.draft("L", size)  # 1/2, 1/4 or 1/8 scale decode; several times faster than full size
    return img if img.mode == "L" else img.convert("L")


def fit_height(img: Image.Image | np.ndarray, height: int) -> np.ndarray:
    """Grayscale and resize to ``height`` rows keeping the aspect ratio: uint8 (height, W')."""
    img = _as_pil(img)
    w, h = img.size
    width = max(1, round(w * height / h))
    return np.asarray(_gray(img, (width, height)).resize((width, height), RESAMPLE))


def squash(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Grayscale and resize to (size, size) ignoring the aspect ratio: uint8 (size, size).

    Leaks the acquisition width: a 1536-wide scan is squeezed 3x more than a 512-wide one.
    """
    img = _as_pil(img)
    return np.asarray(_gray(img, (size, size)).resize((size, size), RESAMPLE))


def pad_width(a: np.ndarray, width: int, value=None) -> np.ndarray:
    """Pad (H, W) symmetrically to at least ``width`` columns with ``value`` (None: ``a.min()``,
    the background)."""
    missing = width - a.shape[1]
    if missing <= 0:
        return a
    left = missing // 2
    fill = a.min() if value is None else value
    return np.pad(a, ((0, 0), (left, missing - left)), constant_values=fill)


def crop_square(a: np.ndarray, left: int | None = None) -> np.ndarray:
    """Square (H, H) window of a strip (H, W); ``left=None`` centres it. Narrow strips are padded."""
    h = a.shape[0]
    a = pad_width(a, h)
    if left is None:
        left = (a.shape[1] - h) // 2
    if not 0 <= left <= a.shape[1] - h:
        raise ValueError(
            f"left={left} outside [0, {a.shape[1] - h}] for a strip of width {a.shape[1]}"
        )
    return a[:, left : left + h]


def to_unit_range(a: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return a.astype(np.float32) / 127.5 - 1.0
