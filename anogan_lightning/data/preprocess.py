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

:func:`normalize_bscan` is the retina normalisation of one 2-D B-scan (Kermany, a folder of
B-scans, a volume's B-scans): :func:`detect_retina` (3 on a binned copy, with per-scan failure
checks raising :class:`RetinaNotFoundError`), flattening as 4, a band defined by the anatomy
(ILM/BM plus margins) or a physical depth, resampled to a fixed height and column size, and
percentile intensity normalisation as 1; settings in :class:`RetinaNorm`.
Detection lengths (:class:`BoundaryParams`) are in pixels of a reference B-scan of 496 rows
(~3.9 µm) and 11.5 µm columns; :meth:`BoundaryParams.scaled` adapts them to other samplings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=64)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) float32 weights: ``row @ M`` resamples a row of ``n_in`` samples to
    ``n_out``. Shrinking averages the input over each output pixel's footprint (exact area
    weights, columns sum to 1); growing interpolates linearly between pixel centres.
    Cached (B-scans of one device share their sizes) and read-only."""
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
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


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

    Why not ``skimage.graph`` (``route_through_array`` / ``MCP`` with column-advancing offsets
    ``(-max_jump..max_jump, 1)``): with ``jump_penalty=0`` it finds the same path (checked in
    tests/test_bscan_preprocess.py), but it cannot add a per-row-of-change cost (only
    ``MCP_Flexible`` with a Python callback could, far slower), it needs non-negative costs,
    it does not batch B-scans, and it is an order of magnitude slower on a B-scan-sized cost
    image (``benchmarks/preprocess.py`` times both).
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
    penalty = (jump_penalty * np.abs(np.arange(k) - max_jump)).astype(np.float32)[:, None, None]
    back = np.empty((w, n, h), dtype=np.int8)  # row offset to the previous column
    padded = np.full((n, h + 2 * max_jump), 2 * _BIG, dtype=np.float32)
    inner = padded[:, max_jump : max_jump + h]
    # window[j] = acc shifted by j - max_jump rows: a view, refreshed when ``inner`` is written
    s0, s1 = padded.strides
    window = as_strided(padded, shape=(k, n, h), strides=(s1, s0, s1), writeable=False)
    cand = np.empty((k, n, h), dtype=np.float32)
    best = np.empty((n, h), dtype=np.float32)
    inner[:] = c[:, :, 0]
    for x in range(1, w):
        # all k shifts at once, then min and argmin over them: a handful of numpy calls per
        # column rather than four per shift (call overhead dominates on one B-scan); argmin
        # keeps the first minimum, the smallest offset, as a strict "<" over the shifts would
        np.add(window, penalty, out=cand)
        back[x] = cand.argmin(axis=0)
        cand.min(axis=0, out=best)
        best += c[:, :, x]
        best -= best.min(axis=1, keepdims=True)  # keeps float32 sums small and precise
        inner[:] = best
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
    rows = np.arange(h)[:, None]
    everywhere = white.all(axis=0)
    # lengths of the leading white runs from the top and the bottom (argmin: the first dark row)
    n_top = np.where(everywhere, h, np.argmin(white, axis=0))
    n_bottom = np.where(everywhere, h, np.argmin(white[::-1], axis=0))
    fill = (rows < n_top) & (n_top >= min_run)
    fill |= (rows >= h - n_bottom) & (n_bottom >= min_run)
    fill |= (white.mean(axis=0) > 0.9)[None, :]
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


# ------------------------------------------------------------------------------ retina-normalised B-scans


FLATTEN_MODES = ("bm", "smooth", "none")


def flatten_mode(flatten: bool | str) -> str:
    """``True`` -> ``"bm"``, ``False`` -> ``"none"``; a name is checked against FLATTEN_MODES."""
    if isinstance(flatten, bool):
        return "bm" if flatten else "none"
    if flatten not in FLATTEN_MODES:
        raise ValueError(f"flatten={flatten!r}; expected true, false or one of {FLATTEN_MODES}")
    return flatten


def smooth_reference(bm: np.ndarray, degree: int = 2) -> np.ndarray:
    """A degree-``degree`` polynomial through BM rows (W,), fitted robustly (see RetinaNorm)."""
    bm = np.asarray(bm, dtype=np.float64)
    x = np.linspace(-1.0, 1.0, len(bm))
    keep = np.ones(len(bm), bool)
    for _ in range(2):
        coef = np.polynomial.polynomial.polyfit(x[keep], bm[keep], degree)
        res = bm - np.polynomial.polynomial.polyval(x, coef)
        mad = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep]))) + 1e-6
        new = np.abs(res) <= 3.0 * mad
        if new.sum() <= degree + 1 or (new == keep).all():
            break
        keep = new
    return np.polynomial.polynomial.polyval(x, coef)


class RetinaNotFoundError(ValueError):
    """:func:`normalize_bscan` found no plausible retina in a B-scan; the message says why."""


BAND_MODES = ("anatomy", "depth", "frame")


@dataclass(frozen=True)
class RetinaNorm:
    """Settings of :func:`normalize_bscan`; each step can be switched off.

    Band (rows kept, before the resample to ``height`` rows):

    - ``"anatomy"``: from ``above_ilm`` x the median retina thickness above the ILM's highest
      point (its 2nd percentile) to ``below_bm`` x that thickness under BM (98th percentile
      without flattening): no spacing needed, so scans of any device put the retina at the same
      place and scale.
    - ``"depth"``: a fixed physical depth, ``depth_um`` above to ``below_bm_um`` below BM;
      needs the row spacing (``spacing_y_um`` or the file's), so retinal thickness is kept.
    - ``"frame"``: every row of the scan.

    Flattening (``flatten``): ``True`` / ``"bm"`` shifts every column so the detected BM is a
    straight row; ``"smooth"`` shifts it onto a degree-``flatten_degree`` polynomial fitted to
    BM (robustly: columns more than 3 scaled MADs off the first fit are dropped and the curve is
    refitted), which removes the scan's tilt and curvature (device, head position) but keeps
    local deformations of BM: drusen, pigment-epithelial detachments and CNV lift the RPE over
    a fraction of the width, and straightening the detected boundary would erase exactly that
    evidence; ``False`` / ``"none"`` shifts every column by the median BM (centring only).

    Columns: resampled to ``target_spacing_x_um`` when it and the column spacing
    (``spacing_x_um`` or the file's) are known, else scaled by ``x_scale`` (output columns per
    input column): a fixed lateral pixel size either way, never one that depends on the scan.
    """

    height: int = 64
    band: str = "anatomy"
    above_ilm: float = 0.25
    below_bm: float = 0.25
    depth_um: float = 500.0
    below_bm_um: float = 120.0
    flatten: bool | str = True
    flatten_degree: int = 2
    spacing_y_um: float | None = None
    spacing_x_um: float | None = None
    target_spacing_x_um: float | None = None
    x_scale: float = 0.5
    intensity_percentiles: tuple[float, float] | None = (1.0, 99.5)
    fill_white: bool = True  # uint8 scans: registration fill is no evidence, becomes background
    check: bool = True  # the failure checks below (off: every scan passes)
    min_thickness: float = 0.06  # median ILM-BM distance, fraction of the frame's rows
    min_contrast: float = 0.08  # retina minus vitreous median, fraction of the intensity range
    max_off_frame: float = 0.25  # fraction of columns whose ILM or BM touches the frame's edge
    max_columns: int = 128  # detection runs on columns binned to at most this many
    detect_rows: int = 512  # ... and rows binned to about this many (then refined on full rows)

    def __post_init__(self) -> None:
        if self.band not in BAND_MODES:
            raise ValueError(f"band={self.band!r}; expected one of {BAND_MODES}")
        if flatten_mode(self.flatten) == "smooth" and not 0 <= self.flatten_degree <= 6:
            raise ValueError(f"flatten_degree={self.flatten_degree}: expected 0..6")
        if self.height < 1 or self.x_scale <= 0 or self.max_columns < 8:
            raise ValueError("height >= 1, x_scale > 0 and max_columns >= 8 are required")
        p = self.intensity_percentiles
        if p is not None and not 0 <= p[0] < p[1] <= 100:
            raise ValueError(f"intensity_percentiles={p}: need 0 <= lo < hi <= 100")

    def key(self) -> dict:
        """Every setting, for cache keys."""
        d = dict(self.__dict__)
        if d["intensity_percentiles"] is not None:
            d["intensity_percentiles"] = [float(v) for v in d["intensity_percentiles"]]
        return d


@dataclass
class NormalizedBScan:
    """One retina-normalised B-scan (:func:`normalize_bscan`).

    ``band`` (height, W') float32 in [-1, 1]; ``valid`` (height, W') bool, False where the band
    reaches beyond the scan or into registration fill (set to the background); ``ilm``/``bm``
    (W',) float rows in the band; ``ilm_in``/``bm_in`` (W,) rows in the input scan.
    :meth:`apply` maps a mask of the input scan onto the band the same way.
    """

    band: np.ndarray
    valid: np.ndarray
    ilm: np.ndarray
    bm: np.ndarray
    ilm_in: np.ndarray
    bm_in: np.ndarray
    shifts: np.ndarray  # (W,) int64: input row = band row (before the row resample) + top + shift
    top: int
    rows: int  # input rows of the band before the resample
    row_matrix: np.ndarray  # (rows, height) resample weights
    col_matrix: np.ndarray | None  # (W, W') resample weights; None: columns kept

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) mask of the input scan -> (height, W') uint8 in the band (a pixel is a lesion
        where lesion pixels cover at least half of it)."""
        m = _gather_band(
            (np.asarray(mask) != 0).astype(np.float32), self.shifts, self.top, self.rows
        )[0]
        m = self.row_matrix.T @ m
        if self.col_matrix is not None:
            m = m @ self.col_matrix
        return (m >= 0.5).astype(np.uint8)


def _gather_band(
    a: np.ndarray, shifts: np.ndarray, top: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """out[r, c] = a[top + r + shifts[c], c] for r < rows, and whether that row is in the scan."""
    h = a.shape[0]
    src = top + np.arange(rows)[:, None] + shifts[None, :]
    inside = (src >= 0) & (src < h)
    np.clip(src, 0, h - 1, out=src)
    return np.take_along_axis(a, src, axis=0), inside


def _bin2d(x: np.ndarray, valid: np.ndarray | None, fy: int, fx: int):
    """Block means over (fy, fx) pixels, edge-padded; invalid pixels left out. -> (x, valid)."""
    h, w = x.shape
    py, px = (-h) % fy, (-w) % fx
    if py or px:
        x = np.pad(x, ((0, py), (0, px)), mode="edge")
        valid = None if valid is None else np.pad(valid, ((0, py), (0, px)), mode="edge")
    shape = (x.shape[0] // fy, fy, x.shape[1] // fx, fx)
    if valid is None:
        return x.reshape(shape).mean(axis=(1, 3), dtype=np.float32), None
    v = valid.reshape(shape)
    n = v.sum(axis=(1, 3))
    s = (x.reshape(shape) * v).sum(axis=(1, 3), dtype=np.float32)
    return np.where(n > 0, s / np.maximum(n, 1), -1.0).astype(np.float32), n * 2 > fy * fx


def _refine(g: np.ndarray, coarse: np.ndarray, radius: int, sign: float) -> np.ndarray:
    """Per column, the row within ``radius`` of ``coarse`` where ``sign * g`` is largest."""
    h = g.shape[0]
    offsets = np.arange(-radius, radius + 1)
    rows = np.clip(np.round(coarse).astype(np.int64)[None, :] + offsets[:, None], 0, h - 1)
    vals = np.take_along_axis(g, rows, axis=0) * sign
    return rows[np.argmax(vals, axis=0), np.arange(g.shape[1])]


def _fail(name: str, why: str) -> RetinaNotFoundError:
    return RetinaNotFoundError(f"{name}: {why}" if name else why)


def detect_retina(
    img: np.ndarray,
    s: RetinaNorm | None = None,
    spacing_y_um: float | None = None,
    spacing_x_um: float | None = None,
    name: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ILM and BM rows (W,) float64 of one B-scan (H, W), checked; and its valid mask.

    Detection runs on a copy binned to about ``detect_rows`` rows and ``max_columns`` columns
    (the minimum-cost paths cost one numpy pass per column, and their row jumps grow with the
    row resolution), with :class:`BoundaryParams` scaled to that sampling; ILM and BM are then
    refined to the strongest edge of the full-resolution rows within one bin and interpolated
    to every column. Raises :class:`RetinaNotFoundError` (naming ``name``) when the checks of
    ``s`` fail: a constant or mostly-fill scan, a median retina thinner than ``min_thickness``
    of the frame, a retina not brighter than the vitreous above it by ``min_contrast``, or ILM
    or BM on the frame's edge in more than ``max_off_frame`` of the columns.
    """
    s = s or RetinaNorm()
    a = np.asarray(img)
    if a.ndim != 2 or min(a.shape) < 16:
        raise ValueError(f"{name}: expected a 2-D B-scan of at least 16x16, got {a.shape}")
    h, w = a.shape
    valid = fill_mask(a) if (s.fill_white and a.dtype == np.uint8) else None
    if valid is not None and valid.mean() < 0.5:
        raise _fail(name, f"{100 * (1 - valid.mean()):.0f}% of the scan is registration fill")
    x = a.astype(np.float32)
    sample = x[valid] if valid is not None else x
    lo, hi = np.percentile(sample[:: max(1, sample.size // 50_000)], (0.5, 99.5))
    if hi <= lo:
        raise _fail(name, "constant image (no retina)")
    x = np.clip((x - lo) * np.float32(2.0 / (hi - lo)) - 1.0, -1.0, 1.0)

    fy = max(1, round(h / s.detect_rows))
    fx = max(1, -(-w // s.max_columns))
    xc, vc = _bin2d(x, valid, fy, fx)
    sy = spacing_y_um if spacing_y_um is not None else s.spacing_y_um
    sx = spacing_x_um if spacing_x_um is not None else s.spacing_x_um
    rows = (3.87 / sy if sy else h / 496) / fy  # x the reference rows per mm
    cols = (11.5 / sx if sx else 1.0) / fx
    params = BoundaryParams().scaled(rows=rows, cols=cols)
    ilm_c, bm_c = detect_boundaries(xc, params, vc)
    ilm_c = ilm_c * fy + (fy - 1) / 2
    bm_c = bm_c * fy + (fy - 1) / 2
    if fy > 1:  # refine on the full rows of the column-binned scan
        xr, _ = _bin2d(x, valid, 1, fx)
        g = _vertical_gradient(gaussian_filter(xr, (1.0, 1.0), mode="nearest")[None])[0]
        bm_c = _refine(g, bm_c, fy, -1.0).astype(np.float64)  # bright above, dark below
        ilm_c = _refine(g, ilm_c, fy, 1.0).astype(np.float64)  # dark above, bright below
    centres = np.arange(len(bm_c)) * fx + (fx - 1) / 2
    cols_all = np.arange(w)
    ilm = np.interp(cols_all, centres, ilm_c)
    bm = np.interp(cols_all, centres, bm_c)
    if s.check:
        _check_retina(xc, vc, ilm_c, bm_c, fy, h, s, name)
    return ilm, bm, valid


def _check_retina(xc, vc, ilm_c, bm_c, fy, h, s: RetinaNorm, name: str) -> None:
    thickness = bm_c - ilm_c
    med = float(np.median(thickness))
    if med < s.min_thickness * h:
        raise _fail(
            name,
            f"no retina found (median ILM-BM distance {med:.0f} rows, "
            f"< min_thickness={s.min_thickness} of {h} rows)",
        )
    edge = max(2, fy)
    off = float(np.mean((ilm_c <= edge) | (bm_c >= h - 1 - edge)))
    if off > s.max_off_frame:
        raise _fail(
            name,
            f"boundaries off the frame: ILM or BM on the edge in {100 * off:.0f}% of the columns "
            f"(> max_off_frame={s.max_off_frame})",
        )
    r = np.arange(xc.shape[0])[:, None] * fy + (fy - 1) / 2
    retina = (r >= ilm_c) & (r <= bm_c)
    vitreous = r < ilm_c - 0.25 * med
    if vc is not None:
        retina &= vc
        vitreous &= vc
    if vitreous.sum() < 0.01 * vitreous.size or not retina.any():
        return  # no vitreous in view (a retina filling the frame is caught by the edge check)
    contrast = (np.median(xc[retina]) - np.median(xc[vitreous])) / 2.0
    if contrast < s.min_contrast:
        raise _fail(
            name,
            f"no retina found (retina only {contrast:+.2f} of the range brighter than the "
            f"vitreous, < min_contrast={s.min_contrast})",
        )


def normalize_bscan(
    img: np.ndarray,
    s: RetinaNorm | None = None,
    spacing_y_um: float | None = None,
    spacing_x_um: float | None = None,
    name: str = "",
) -> NormalizedBScan:
    """Retina-normalised band of one B-scan (H, W) (uint8, or float of any range).

    Steps (:class:`RetinaNorm`): ILM and BM (:func:`detect_retina`, with its failure checks:
    :class:`RetinaNotFoundError` naming ``name``), flatten (``flatten``: on BM or a smooth
    curve through it; whole-row column shifts as :func:`flatten_crop`), crop the ``band``,
    resample it to ``height`` rows and a fixed column size (area averaging when shrinking),
    and map the ``intensity_percentiles`` of its valid pixels to [-1, 1] (None: uint8 0..255
    to [-1, 1]). Pixels beyond the scan or in registration fill are set to the band's
    background (its 10th percentile). The file's spacings, where known, are passed as
    ``spacing_*_um`` and win over those of ``s``.
    """
    s = s or RetinaNorm()
    a = np.asarray(img)
    ilm, bm, valid = detect_retina(a, s, spacing_y_um, spacing_x_um, name)
    h, w = a.shape
    sy = spacing_y_um if spacing_y_um is not None else s.spacing_y_um
    sx = spacing_x_um if spacing_x_um is not None else s.spacing_x_um

    mode = flatten_mode(s.flatten)
    ref = smooth_reference(bm, s.flatten_degree) if mode == "smooth" else bm
    bm_i = np.round(ref).astype(np.int64)
    shifts = column_shifts(bm_i, int(np.round(np.median(bm_i))), mode != "none")
    ilm_f, bm_f = ilm - shifts, bm - shifts  # rows after flattening
    thick = float(np.median(bm_f - ilm_f))
    if s.band == "anatomy":
        top = np.percentile(ilm_f, 2) - s.above_ilm * thick
        bottom = np.percentile(bm_f, 98) + s.below_bm * thick
    elif s.band == "depth":
        if not sy:
            raise ValueError(
                f"{name}: band='depth' needs the row spacing (spacing_y_um), which is unknown"
            )
        top = np.percentile(bm_f, 2) - s.depth_um / sy
        bottom = np.percentile(bm_f, 98) + s.below_bm_um / sy
    else:
        top, bottom = 0.0, float(h)
    top_i = int(np.floor(top))
    rows = max(1, int(np.ceil(bottom)) - top_i)

    x = a.astype(np.float32)
    band, inside = _gather_band(x, shifts, top_i, rows)
    ok = inside if valid is None else inside & _gather_band(valid, shifts, top_i, rows)[0]
    row_m = resample_matrix(rows, s.height)
    band = row_m.T @ np.where(ok, band, 0.0)
    weight = row_m.T @ ok.astype(np.float32)
    if sx and s.target_spacing_x_um:
        w_out = resampled_width(w, sx, s.target_spacing_x_um)
    else:
        w_out = max(1, round(w * s.x_scale))
    col_m = None if w_out == w else resample_matrix(w, w_out)
    if col_m is not None:
        band, weight = band @ col_m, weight @ col_m
    ok_out = weight >= 0.5
    band = np.where(ok_out, band / np.maximum(weight, 1e-6), 0.0).astype(np.float32)
    if not ok_out.any():
        raise _fail(name, "the retina band lies outside the scan")
    if s.intensity_percentiles is not None:
        lo, hi = np.percentile(band[ok_out], s.intensity_percentiles)
        if hi <= lo:
            raise _fail(name, "constant retina band")
        band = (band - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - 1.0
        np.clip(band, -1.0, 1.0, out=band)
    else:
        band = band / np.float32(127.5) - 1.0 if a.dtype == np.uint8 else band
    band[~ok_out] = np.percentile(band[ok_out], 10)

    scale_y = s.height / rows
    out_cols = (np.arange(w_out) + 0.5) * w / w_out - 0.5
    ilm_b = np.interp(out_cols, np.arange(w), (ilm_f - top_i + 0.5) * scale_y - 0.5)
    bm_b = np.interp(out_cols, np.arange(w), (bm_f - top_i + 0.5) * scale_y - 0.5)
    return NormalizedBScan(band, ok_out, ilm_b, bm_b, ilm, bm, shifts, top_i, rows, row_m, col_m)


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
