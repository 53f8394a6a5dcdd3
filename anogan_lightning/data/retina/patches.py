"""Patch geometry on a flattened retina band (AnoGAN's training and test patches).

:func:`random_patch_positions` (training: top-left corners at random, the patch centre inside
the retina) and :func:`grid_patch_positions` (test: a regular grid over the band, the last
row/column flush with the edge, patches that touch the retina only); :func:`extract_patches`;
:func:`patch_labels` (1 when any mask pixel lies in the patch).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anogan_lightning.data.bscan.windows import window_starts


def random_patch_positions(
    ilm: np.ndarray,
    bm: np.ndarray,
    height: int,
    size: int,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n, 2) int64 top-left corners (y, x) of ``size`` patches in a band (height, W) whose
    centre lies between ILM and BM of its centre column (clamped to fit the band).

    ilm, bm: (W,) rows in the band.
    """
    w = ilm.shape[-1]
    if size > height or size > w:
        raise ValueError(f"patch size {size} does not fit a band of {height}x{w}")
    x0 = rng.integers(0, w - size + 1, size=n)
    xc = x0 + size // 2
    lo = np.clip(ilm[xc], size // 2, height - size + size // 2)
    hi = np.clip(bm[xc], lo, height - size + size // 2)
    yc = lo + np.floor(rng.random(n) * (hi - lo + 1)).astype(np.int64)
    return np.stack([yc - size // 2, x0], axis=1).astype(np.int64)


def grid_patch_positions(
    ilm: np.ndarray, bm: np.ndarray, height: int, size: int, stride: int
) -> np.ndarray:
    """(m, 2) int64 top-left corners of a regular grid over a band (height, W), row-major,
    keeping the patches that contain at least one retina pixel (ILM <= row <= BM)."""
    w = ilm.shape[-1]
    if size > height or size > w:
        raise ValueError(f"patch size {size} does not fit a band of {height}x{w}")
    ys, xs = window_starts(height, size, stride), window_starts(w, size, stride)
    keep = []
    for y in ys:
        for x in xs:
            top = np.maximum(ilm[x : x + size], y)
            bottom = np.minimum(bm[x : x + size], y + size - 1)
            if (top <= bottom).any():
                keep.append((y, x))
    return np.array(keep, dtype=np.int64).reshape(-1, 2)


def _check_inside(positions: np.ndarray, size: int, shape: tuple[int, ...]) -> None:
    bad = (positions < 0).any(axis=1) | (positions[:, 0] + size > shape[0])
    bad |= positions[:, 1] + size > shape[1]
    if bad.any():
        y, x = (int(v) for v in positions[np.argmax(bad)])
        raise ValueError(f"patch at ({y}, {x}) of size {size} leaves the image of shape {shape}")


def extract_patches(img: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """(len(positions), size, size) patches of a 2-D image at top-left corners (y, x)."""
    _check_inside(positions, size, img.shape)
    windows = sliding_window_view(img, (size, size))  # a view: no copy until indexed
    return windows[positions[:, 0], positions[:, 1]]


def patch_labels(mask: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """(m,) int64: 1 where any mask pixel lies inside the patch (AnoGAN's test protocol)."""
    if len(positions) == 0:
        return np.zeros(0, dtype=np.int64)
    _check_inside(positions, size, mask.shape)
    # 2-D prefix sums: the count inside every window in O(1)
    c = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    c[1:, 1:] = np.cumsum(np.cumsum(mask != 0, axis=0), axis=1)
    y, x = positions[:, 0], positions[:, 1]
    inside = c[y + size, x + size] - c[y, x + size] - c[y + size, x] + c[y, x]
    return (inside > 0).astype(np.int64)
