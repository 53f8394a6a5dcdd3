"""Retinal boundaries of OCT B-scans: the inner limiting membrane (ILM) and Bruch's membrane
(BM), and the registration fill that carries no image data.

- :func:`detect_boundaries`: ILM and BM, each a minimum-cost path across the B-scan
  (:func:`min_cost_path`, a dynamic programme over columns with at most ``max_jump`` rows of
  change per column and a small cost per row of change). Speckle is suppressed by an
  anisotropic Gaussian (wider along x, where the layers run) before taking the vertical
  gradient. Order: (a) the RPE, the brightest path of the smoothed image with brightness
  weighted by the fraction of the column's brightness above it (the RPE is the deepest bright
  band; a bright nerve fibre layer near the optic disc has little above it); (b) BM, the
  strongest bright-to-dark edge within ``bm_window`` rows under the RPE path; (c) ILM, the
  strongest dark-to-bright edge at least ``ilm_gap`` rows above the RPE path, weighted by the
  fraction of the retina's brightness below it, so that the first edge under the dark vitreous
  wins over the similar edge of the photoreceptor line deeper down.
- :func:`detect_retina`: the same on one 2-D B-scan binned to a working size, refined on its
  full rows, with per-scan failure checks raising :class:`RetinaNotFoundError` (settings in
  :class:`~anogan_lightning.data.retina.normalize.RetinaNorm`).
- :func:`fill_mask`: the near-white fill that registration leaves in Kermany/Spectralis exports.

Detection lengths (:class:`BoundaryParams`) are in pixels of a reference B-scan of 496 rows
(~3.9 µm) and 11.5 µm columns; :meth:`BoundaryParams.scaled` adapts them to other samplings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.ndimage import gaussian_filter, minimum_filter

if TYPE_CHECKING:
    from anogan_lightning.data.retina.normalize import RetinaNorm

_BIG = np.float32(1e9)  # cost of a forbidden pixel (finite: sums stay comparable, no inf - inf)


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


class RetinaNotFoundError(ValueError):
    """:func:`normalize_bscan` found no plausible retina in a B-scan; the message says why."""


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
    s: RetinaNorm,
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
