"""OCT volume preprocessing as pure numpy functions (AnoGAN, Schlegl et al. 2017, sec. 3).

Pipeline per volume, arrays (n B-scans, rows, columns):

1. :func:`normalize_intensity`: robust per-volume scaling to float32 [-1, 1] (the 0.5th and
   99.5th percentiles map to -1 and 1, values beyond are clipped), so that one hot pixel or a
   saturated RPE does not set the contrast.
2. :func:`resample_x`: each B-scan resampled along x from the file's column spacing to a target
   spacing (the paper: ~22 µm per column, ~256 columns); area averaging when shrinking (no
   aliasing of speckle), linear interpolation when growing. Rows are not resampled.
3. :func:`detect_boundaries`: inner limiting membrane (ILM, top of the retina) and Bruch's
   membrane (BM, bottom of the bright RPE band), each a minimum-cost path across the B-scan
   (:func:`min_cost_path`, a dynamic programme over columns with at most ``max_jump`` rows of
   change per column and a small cost per row of change). Speckle is suppressed by an anisotropic
   Gaussian (wider along x, where the layers run) before taking the vertical gradient. Order:
   (a) the RPE, the brightest path of the smoothed image with brightness weighted by the fraction
   of the column's brightness above it (the RPE is the deepest bright band; a bright nerve fibre
   layer near the optic disc has little above it); (b) BM, the strongest bright-to-dark edge
   within ``bm_window`` rows under the RPE path; (c) ILM, the strongest dark-to-bright edge at
   least ``ilm_gap`` rows above the RPE path, weighted by the fraction of the retina's brightness
   below it, so that the first edge under the dark vitreous wins over the similar edge of the
   photoreceptor line deeper down.
4. :func:`flatten_crop`: every column shifted so that BM lands on one row, then a fixed band of
   ``height`` rows kept with BM ``below`` rows above its bottom (the retina between ILM and BM,
   plus margin). Shifts are whole rows (speckle is not interpolated); rows shifted in from
   beyond the scan repeat its edge row.
5. Patches: :func:`random_patch_positions` (training: top-left corners at random, the patch
   centre inside the retina) and :func:`grid_patch_positions` (test: a regular grid over the
   band, the last row/column flush with the edge, patches that touch the retina only);
   :func:`extract_patches`; :func:`patch_labels` (1 when any mask pixel lies in the patch).

:func:`flatten_bscan` applies 3-4 to one 2-D B-scan (e.g. a Kermany JPEG) keeping its shape.
Detection lengths (:class:`BoundaryParams`) are in pixels of a reference B-scan of 496 rows
(~3.9 µm) and 11.5 µm columns; :meth:`BoundaryParams.scaled` adapts them to other samplings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from scipy.ndimage import gaussian_filter, minimum_filter

_BIG = np.float32(1e9)  # cost of a forbidden pixel (finite: sums stay comparable, no inf - inf)


# ------------------------------------------------------------------------------ intensities


def normalize_intensity(
    volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Any-dtype volume -> float32 in [-1, 1]: percentiles ``(lo, hi)`` map to -1 and 1.

    The percentiles are taken on every second row and column (4x fewer values, same result to
    within a grey level on OCT-sized volumes). A constant volume maps to -1.
    """
    v = np.asarray(volume)
    sample = v[..., ::2, ::2] if v.ndim >= 2 and min(v.shape[-2:]) > 8 else v
    lo, hi = np.percentile(sample.astype(np.float32), percentiles)
    scale = 2.0 / (hi - lo) if hi > lo else 0.0
    out = (v.astype(np.float32) - np.float32(lo)) * np.float32(scale) - 1.0
    return np.clip(out, -1.0, 1.0, out=out)


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) float32 weights: ``row @ M`` resamples a row of ``n_in`` samples to
    ``n_out``. Shrinking averages the input over each output pixel's footprint (exact area
    weights, columns sum to 1); growing interpolates linearly between pixel centres."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resample {n_in} columns to {n_out}")
    f = n_in / n_out
    m = np.zeros((n_in, n_out), dtype=np.float64)
    if f >= 1:
        edges = np.arange(n_out + 1) * f  # output pixel j covers input [edges[j], edges[j+1])
        i = np.arange(n_in)[:, None]
        overlap = np.minimum(i + 1, edges[None, 1:]) - np.maximum(i, edges[None, :-1])
        m = np.clip(overlap, 0, None) / f
    else:
        src = np.clip((np.arange(n_out) + 0.5) * f - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        frac = src - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        cols = np.arange(n_out)
        np.add.at(m, (i0, cols), 1 - frac)
        np.add.at(m, (i1, cols), frac)
    return m.astype(np.float32)


def resampled_width(n_cols: int, spacing_x_um: float, target_spacing_x_um: float) -> int:
    """Columns after resampling ``n_cols`` columns of ``spacing_x_um`` to the target spacing."""
    return max(1, round(n_cols * spacing_x_um / target_spacing_x_um))


def resample_x(bscans: np.ndarray, spacing_x_um: float, target_spacing_x_um: float) -> np.ndarray:
    """(..., rows, W) float -> (..., rows, W') float32 with W' = W * spacing / target."""
    n_out = resampled_width(bscans.shape[-1], spacing_x_um, target_spacing_x_um)
    if n_out == bscans.shape[-1]:
        return bscans.astype(np.float32, copy=False)
    return bscans.astype(np.float32, copy=False) @ resample_matrix(bscans.shape[-1], n_out)


def resample_mask_x(mask: np.ndarray, n_out: int) -> np.ndarray:
    """(..., rows, W) {0, 1} -> (..., rows, n_out) uint8: a lesion where it covers >= half of the
    output pixel (area weights) or, when growing, where the nearer input pixel is one."""
    if n_out == mask.shape[-1]:
        return (mask != 0).astype(np.uint8)
    m = resample_matrix(mask.shape[-1], n_out)
    return (((mask != 0).astype(np.float32) @ m) >= 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------ boundaries


def min_cost_path(
    cost: np.ndarray,
    max_jump: int = 2,
    jump_penalty: float = 0.0,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Rows (n, W) int64 of the cheapest left-to-right path through each of ``n`` cost images.

    Args:
        cost: (n, H, W) or (H, W) float; a path takes one pixel per column.
        max_jump: the path's row changes by at most this much between neighbouring columns.
        jump_penalty: added cost per row of change (smoother paths under noise).
        allowed: bool mask like ``cost``; the path avoids forbidden pixels where it can.

    A dynamic programme over columns, vectorised over images and rows: O(n·H·W·(2·max_jump+1)).
    """
    squeeze = cost.ndim == 2
    c = np.asarray(cost, dtype=np.float32)
    if squeeze:
        c = c[None]
        allowed = None if allowed is None else allowed[None]
    if allowed is not None:
        c = np.where(allowed, c, _BIG)
    n, h, w = c.shape
    k = 2 * max_jump + 1
    penalty = [np.float32(jump_penalty * abs(j - max_jump)) for j in range(k)]
    back = np.empty((w, n, h), dtype=np.int8)  # row offset to the previous column
    padded = np.full((n, h + 2 * max_jump), 2 * _BIG, dtype=np.float32)
    inner = padded[:, max_jump : max_jump + h]
    # window[j] = acc shifted by j - max_jump rows: a view, refreshed when ``inner`` is written
    s0, s1 = padded.strides
    window = as_strided(padded, shape=(k, n, h), strides=(s1, s0, s1), writeable=False)
    best = np.empty((n, h), dtype=np.float32)
    cand = np.empty_like(best)
    better = np.empty((n, h), dtype=bool)
    arg = np.empty((n, h), dtype=np.int8)
    inner[:] = c[:, :, 0]
    for x in range(1, w):
        # min and argmin over the k shifts, elementwise and in place (numpy's argmin over a short
        # axis is several times slower)
        np.add(window[0], penalty[0], out=best)
        arg.fill(0)
        for j in range(1, k):
            np.add(window[j], penalty[j], out=cand)
            np.less(cand, best, out=better)
            np.copyto(best, cand, where=better)
            np.copyto(arg, j, where=better)
        best += c[:, :, x]
        best -= best.min(axis=1, keepdims=True)  # keeps float32 sums small and precise
        inner[:] = best
        back[x] = arg
    back -= max_jump
    acc = inner
    rows = np.empty((n, w), dtype=np.int64)
    r = acc.argmin(axis=1)
    idx = np.arange(n)
    for x in range(w - 1, -1, -1):
        rows[:, x] = r
        if x:
            r = r + back[x, idx, r]
    return rows[0] if squeeze else rows


@dataclass(frozen=True)
class BoundaryParams:
    """Detection lengths in pixels of the reference B-scan: 496 rows of ~3.9 µm, columns of
    ~11.5 µm (a 512-column Spectralis scan); :meth:`scaled` adapts them to other samplings."""

    sigma_y: float = 2.0  # Gaussian smoothing across rows ...
    sigma_x: float = 4.0  # ... and along the layers (columns)
    max_jump: int = 3  # rows of change per column of a boundary
    jump_penalty: float = 0.05  # per row of change, in units of a typical edge cost
    bm_window: int = 24  # BM lies within this many rows under the RPE path
    ilm_gap: int = 12  # ILM lies at least this many rows above the RPE path

    def scaled(self, rows: float = 1.0, cols: float = 1.0) -> BoundaryParams:
        """For ``rows`` x the reference rows per mm and ``cols`` x its columns per mm
        (e.g. rows = H / 496, cols = 11.5 / column spacing in µm); with useful minimums."""
        return BoundaryParams(
            sigma_y=max(0.7, self.sigma_y * rows),
            sigma_x=max(1.0, self.sigma_x * cols),
            max_jump=max(1, round(self.max_jump * rows / cols)),
            jump_penalty=self.jump_penalty,
            bm_window=max(4, round(self.bm_window * rows)),
            ilm_gap=max(3, round(self.ilm_gap * rows)),
        )


def _vertical_gradient(s: np.ndarray) -> np.ndarray:
    """Central difference along rows, (n, H, W); edge rows copy their neighbour."""
    g = np.empty_like(s)
    g[:, 1:-1] = (s[:, 2:] - s[:, :-2]) * 0.5
    g[:, 0] = g[:, 1]
    g[:, -1] = g[:, -2]
    return g


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale each image (n, H, W) by its 99th percentile of |x|, so costs are comparable."""
    scale = np.percentile(np.abs(x[:, ::2, ::2]), 99, axis=(1, 2))
    return x / np.maximum(scale, 1e-6)[:, None, None].astype(np.float32)


def _fill_invalid(b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by the nearest valid pixel of their column (no artificial edges)."""
    n, h, w = b.shape
    rows = np.broadcast_to(np.arange(h)[None, :, None], b.shape)
    last_above = np.maximum.accumulate(np.where(valid, rows, -1), axis=1)
    first_below = np.minimum.accumulate(np.where(valid, rows, h)[:, ::-1], axis=1)[:, ::-1]
    src = np.where(last_above >= 0, last_above, first_below)
    src = np.where(src < h, src, rows)  # columns without valid pixels stay as they are
    return np.take_along_axis(b, src, axis=1)


def detect_boundaries(
    bscans: np.ndarray,
    params: BoundaryParams | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ILM and BM rows, each (n, W) int64, of B-scans (n, H, W) or (H, W) in [-1, 1].

    ``valid`` (same shape, bool) marks pixels that carry image data (False e.g. for the white
    fill of registered Kermany scans): they are replaced by the nearest valid pixel of their
    column and, with a margin of the smoothing width, give no evidence either way.
    """
    p = params or BoundaryParams()
    squeeze = bscans.ndim == 2
    b = np.asarray(bscans, dtype=np.float32)
    if squeeze:
        b = b[None]
        valid = None if valid is None else valid[None]
    n, h, w = b.shape
    if valid is not None:
        b = _fill_invalid(b, valid)
    s = gaussian_filter(b, sigma=(0, p.sigma_y, p.sigma_x), mode="nearest")
    g = _unit(_vertical_gradient(s))  # > 0: darker above, brighter below
    bright = np.clip(_unit(s - np.median(s[:, ::2, ::2], axis=(1, 2))[:, None, None]), 0, None)
    if valid is not None:
        margin = (int(np.ceil(2 * p.sigma_y)) * 2 + 1, int(np.ceil(2 * p.sigma_x)) * 2 + 1)
        evidence = minimum_filter(valid, size=(1, *margin), mode="nearest").astype(np.float32)
        g *= evidence
        bright *= evidence
    rows = np.arange(h)[None, :, None]

    # the RPE: the brightest band with most of the column's brightness above it (the RNFL, as
    # bright near the optic disc, has little above it)
    above_frac = np.cumsum(bright, axis=1)
    above_frac /= np.maximum(above_frac[:, -1:], 1e-6)
    rpe = min_cost_path(-bright * above_frac, p.max_jump, p.jump_penalty)  # (n, W)
    below = (rows >= rpe[:, None, :]) & (rows <= rpe[:, None, :] + p.bm_window)
    bm = min_cost_path(g, p.max_jump, p.jump_penalty, allowed=below)

    # fraction of the column's retinal brightness at or below each row: ~1 at the ILM, lower at
    # the photoreceptor line (the bright inner retina lies above it)
    below_frac = np.cumsum((bright * (rows <= bm[:, None, :]))[:, ::-1], axis=1)[:, ::-1]
    below_frac = below_frac / np.maximum(below_frac[:, :1], 1e-6)
    ilm_allowed = rows <= rpe[:, None, :] - p.ilm_gap
    ilm = min_cost_path(
        -np.clip(g, 0, None) * below_frac, p.max_jump, p.jump_penalty, allowed=ilm_allowed
    )
    if squeeze:
        return ilm[0], bm[0]
    return ilm, bm


# ------------------------------------------------------------------------------ flattening


def column_shifts(bm: np.ndarray, target_row: int, flatten: bool = True) -> np.ndarray:
    """Per-column row shift (..., W) int64 that moves BM to ``target_row``.

    ``flatten=False`` shifts every column of a B-scan by the same amount (its median BM), which
    keeps the retina's curvature but still centres the band on it.
    """
    bm = np.asarray(bm, dtype=np.int64)
    if not flatten:
        med = np.round(np.median(bm, axis=-1, keepdims=True)).astype(np.int64)
        bm = np.broadcast_to(med, bm.shape)
    return bm - target_row


def shift_columns(a: np.ndarray, shifts: np.ndarray, height: int) -> np.ndarray:
    """out[..., r, c] = a[..., r + shifts[..., c], c] for r < ``height``; rows beyond the scan
    repeat its first/last row. a: (..., H, W), shifts: (..., W) -> (..., height, W)."""
    h = a.shape[-2]
    src = np.arange(height)[:, None] + shifts[..., None, :]  # (..., height, W)
    np.clip(src, 0, h - 1, out=src)
    return np.take_along_axis(a, src, axis=-2)


def flatten_crop(
    bscans: np.ndarray,
    ilm: np.ndarray,
    bm: np.ndarray,
    height: int,
    below: int,
    flatten: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten on BM and crop a band of ``height`` rows, BM at row ``height - 1 - below``.

    Returns (band (n, height, W), ilm and bm rows in the band (n, W), shifts (n, W)); apply the
    same shifts to a mask with :func:`shift_columns`.
    """
    if not 0 <= below < height:
        raise ValueError(f"below={below} must lie in [0, height={height})")
    target = height - 1 - below
    shifts = column_shifts(bm, target, flatten)
    band = shift_columns(bscans, shifts, height)
    return band, ilm - shifts, bm - shifts, shifts


def fill_mask(img: np.ndarray, fill_min: int = 250, min_run: int = 1) -> np.ndarray:
    """Valid-pixel mask (H, W) of a uint8 B-scan: False in near-white runs (>= ``fill_min``,
    at least ``min_run`` long) touching the top or bottom of a column, and in columns that are
    near-white throughout: the fill that registration leaves in Kermany/Spectralis exports."""
    white = img >= fill_min
    h = img.shape[0]
    top = np.cumprod(white, axis=0).astype(bool)  # leading white run from the top
    bottom = np.cumprod(white[::-1], axis=0)[::-1].astype(bool)
    top &= top.sum(axis=0, keepdims=True) >= min_run
    bottom &= bottom.sum(axis=0, keepdims=True) >= min_run
    fill = top | bottom
    fill |= white.mean(axis=0, keepdims=True) > 0.9 * np.ones((h, 1), bool)
    return ~fill


def flatten_bscan(
    img: np.ndarray,
    params: BoundaryParams | None = None,
    max_columns: int = 512,
    return_bm: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Flatten one 2-D B-scan (H, W) on its detected BM; same shape and dtype out.

    Every column is shifted by whole rows so that BM lies on the median row of the detected BM
    (the retina stays where it was on average; rows shifted in from beyond the image repeat its
    edge row). Detection runs on columns averaged in groups of ``ceil(W / max_columns)`` (the
    boundaries are smooth along x; rows keep full resolution) and BM is interpolated back to
    every column. Lengths default to the reference 496-row scan, scaled to ``H`` (Kermany
    B-scans are 496 or 512 rows). For uint8 images, near-white fill (:func:`fill_mask`) gives
    the detector no evidence. ``return_bm=True`` also returns the detected BM rows (W,).
    """
    if img.ndim != 2:
        raise ValueError(f"flatten_bscan expects a 2-D B-scan, got shape {img.shape}")
    h, w = img.shape
    f = max(1, -(-w // max_columns))  # column bin
    p = params or BoundaryParams().scaled(rows=h / 496, cols=1.0 / f)
    valid = fill_mask(img) if img.dtype == np.uint8 else None
    x = img.astype(np.float32)
    lo, hi = (0.0, 255.0) if valid is not None else (float(x.min()), float(x.max()))
    x = (x - lo) / max(hi - lo, 1e-6) * 2 - 1
    if f > 1:
        pad = (-w) % f
        xp = np.pad(x, ((0, 0), (0, pad)), mode="edge").reshape(h, -1, f)
        if valid is not None:
            vp = np.pad(valid, ((0, 0), (0, pad)), mode="edge").reshape(h, -1, f)
            n_valid = vp.sum(axis=2)
            x = np.where(n_valid > 0, (xp * vp).sum(axis=2) / np.maximum(n_valid, 1), -1.0)
            valid = n_valid * 2 > f
        else:
            x = xp.mean(axis=2)
    _, bm = detect_boundaries(x.astype(np.float32), p, valid)
    if f > 1:  # bin centres -> every column
        centres = np.arange(len(bm)) * f + (f - 1) / 2
        bm = np.round(np.interp(np.arange(w), centres, bm)).astype(np.int64)
    target = int(np.round(np.median(bm)))
    out = shift_columns(img, bm - target, h)
    return (out, bm) if return_bm else out


# ------------------------------------------------------------------------------ patches


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


def _grid_starts(length: int, size: int, stride: int) -> np.ndarray:
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # the last patch flush with the edge: full coverage
    return np.array(starts, dtype=np.int64)


def grid_patch_positions(
    ilm: np.ndarray, bm: np.ndarray, height: int, size: int, stride: int
) -> np.ndarray:
    """(m, 2) int64 top-left corners of a regular grid over a band (height, W), row-major,
    keeping the patches that contain at least one retina pixel (ILM <= row <= BM)."""
    w = ilm.shape[-1]
    if size > height or size > w:
        raise ValueError(f"patch size {size} does not fit a band of {height}x{w}")
    ys, xs = _grid_starts(height, size, stride), _grid_starts(w, size, stride)
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
