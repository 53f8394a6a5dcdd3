"""Flattening, resampling and intensity normalisation of OCT B-scans as pure numpy functions
(AnoGAN, Schlegl et al. 2017, sec. 3; the retina normalisation of this package).

Volumes, arrays (n B-scans, rows, columns):

1. :func:`normalize_intensity`: robust per-volume scaling to float32 [-1, 1] (the 0.5th and
   99.5th percentiles map to -1 and 1, values beyond are clipped), so that one hot pixel or a
   saturated RPE does not set the contrast.
2. :func:`resample_x`: each B-scan resampled along x from the file's column spacing to a target
   spacing (the paper: ~22 µm per column, ~256 columns); area averaging when shrinking (no
   aliasing of speckle), linear interpolation when growing. Rows are not resampled.
3. boundaries: :mod:`anogan_lightning.data.retina.segment`.
4. :func:`flatten_crop`: every column shifted so that BM lands on one row, then a fixed band of
   ``height`` rows kept with BM ``below`` rows above its bottom (the retina between ILM and BM,
   plus margin). Shifts are whole rows (speckle is not interpolated); rows shifted in from
   beyond the scan repeat its edge row.
5. patches: :mod:`anogan_lightning.data.retina.patches`.

:func:`flatten_bscan` applies 3-4 to one 2-D B-scan (e.g. a Kermany JPEG) keeping its shape.

:func:`normalize_bscan` is the retina normalisation of one 2-D B-scan (Kermany, a folder of
B-scans, a volume's B-scans): :func:`~anogan_lightning.data.retina.segment.detect_retina` (3 on
a binned copy, with per-scan failure checks raising
:class:`~anogan_lightning.data.retina.segment.RetinaNotFoundError`), flattening as 4, a band
defined by the anatomy (ILM/BM plus margins) or a physical depth, resampled to a fixed height
and column size, and percentile intensity normalisation as 1; settings in :class:`RetinaNorm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from anogan_lightning.data.retina.segment import (
    BoundaryParams,
    _fail,
    detect_boundaries,
    detect_retina,
    fill_mask,
)

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

    The defaults are ``conf/data/bscan_folder.yaml``'s ``retina`` keys (Kermany's Spectralis
    rows; ``x_scale`` chosen on kermany val over 0.5 / 0.25 / 0.125,
    experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md).
    """

    height: int = 64
    band: str = "anatomy"
    above_ilm: float = 0.25
    below_bm: float = 0.25
    depth_um: float = 500.0
    below_bm_um: float = 120.0
    flatten: bool | str = True
    flatten_degree: int = 2
    spacing_y_um: float | None = 3.87  # Spectralis rows (Kermany's device)
    spacing_x_um: float | None = None
    target_spacing_x_um: float | None = None
    x_scale: float = 0.125
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
        """Every setting, JSON-safe: for cache keys and checkpoints (:meth:`from_dict`)."""
        d = dict(self.__dict__)
        if d["intensity_percentiles"] is not None:
            d["intensity_percentiles"] = [float(v) for v in d["intensity_percentiles"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RetinaNorm:
        """The settings of a config's ``retina`` keys or of :meth:`key`; an unknown key is an
        error naming it."""
        d = dict(d)
        if d.get("intensity_percentiles") is not None:
            d["intensity_percentiles"] = tuple(d["intensity_percentiles"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"retina: {e} (keys: RetinaNorm's fields)") from None


@dataclass
class NormalizedBScan:
    """One retina-normalised B-scan (:func:`normalize_bscan`).

    ``band`` (height, W') float32 in [-1, 1]; ``valid`` (height, W') bool, False where the band
    reaches beyond the scan or into registration fill (set to the background); ``ilm``/``bm``
    (W',) float rows in the band; ``ilm_in``/``bm_in`` (W,) rows in the input scan;
    ``boundaries``: ``"detected"`` (:func:`detect_retina`) or ``"given"`` (passed in, e.g. a
    device's own segmentation). :meth:`apply` maps a mask of the input scan onto the band the
    same way; :meth:`to_scan` carries a map of the band back onto the scan's pixel grid, and
    :meth:`unreliable_columns` says where the boundaries it rests on are implausible.
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
    scan_shape: tuple[int, int] = (0, 0)  # (H, W) of the input scan
    boundaries: str = "detected"

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

    def to_scan(self, band_map: np.ndarray) -> np.ndarray:
        """A map of the band (height, W'), or wider: a band padded symmetrically to a window's
        width, as the datasets pad narrow bands) -> (H, W) float32 on the input scan's pixel
        grid, NaN where the band does not reach (above and below it).

        The inverse of the band's three steps, each undone with the weights that made it:
        columns (an input column takes the overlap-weighted mean of the band columns it fed),
        rows (likewise, from the band's row resample) and the flattening (band row r of column
        c lies on scan row ``top + r + shifts[c]``). Where the forward step averaged several
        input pixels into one band pixel, they all get that pixel's value, so the map is
        piecewise constant at the band's resolution; NaN in the band map stays NaN.
        """
        m = np.asarray(band_map, dtype=np.float32)
        h_out, w_out = self.band.shape
        if m.ndim != 2 or m.shape[0] != h_out or m.shape[1] < w_out:
            raise ValueError(f"a band map must be ({h_out}, >= {w_out}), got {m.shape}")
        left = (m.shape[1] - w_out) // 2  # the symmetric padding of pad_width
        m = m[:, left : left + w_out]
        if self.col_matrix is not None:
            m = _weighted_back(m, self.col_matrix, axis=1)  # (height, W)
        m = _weighted_back(m, self.row_matrix, axis=0)  # (rows, W)
        h, w = self.scan_shape
        rho = np.arange(h)[:, None] - self.top - self.shifts[None, :]  # band row of scan row y
        inside = (rho >= 0) & (rho < self.rows)
        out = np.take_along_axis(m, np.clip(rho, 0, self.rows - 1), axis=0)
        out[~inside] = np.nan
        return out

    def unreliable_columns(self, low: float = 0.5, high: float = 2.0) -> np.ndarray:
        """(W,) bool: columns of the input scan where the retina was not found reliably, so a
        map there is not evidence about the tissue: the ILM-BM distance below ``low`` or above
        ``high`` times its median over the scan (a boundary that jumped to another layer, the
        optic disc's cup, the frame edge), or the band column mostly beyond the scan or in
        registration fill (``valid`` on fewer than half of its rows)."""
        t = self.bm_in - self.ilm_in
        med = float(np.median(t))
        bad = (t < low * med) | (t > high * med) if med > 0 else np.ones(len(t), bool)
        covered = self.valid.mean(axis=0) >= 0.5  # (W',)
        if not covered.all():
            cover = covered.astype(np.float32)
            if self.col_matrix is not None:
                cover = _weighted_back(cover[None], self.col_matrix, axis=1)[0]
            bad |= cover < 0.5
        return bad


def _weighted_back(m: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Undo a resample ``out = in @ weights`` (axis 1) or ``weights.T @ in`` (axis 0): each
    input sample gets the mean of the outputs it fed, weighted by its share in them."""
    w = np.asarray(weights, dtype=np.float32)
    norm = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)  # (n_in, n_out), rows sum to 1
    finite = np.isfinite(m)
    z = np.where(finite, m, 0.0).astype(np.float32)
    if axis == 1:
        num, den = z @ norm.T, finite.astype(np.float32) @ norm.T
    else:
        num, den = norm @ z, norm @ finite.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-6, num / np.maximum(den, 1e-12), np.nan).astype(np.float32)


def _gather_band(
    a: np.ndarray, shifts: np.ndarray, top: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """out[r, c] = a[top + r + shifts[c], c] for r < rows, and whether that row is in the scan."""
    h = a.shape[0]
    src = top + np.arange(rows)[:, None] + shifts[None, :]
    inside = (src >= 0) & (src < h)
    np.clip(src, 0, h - 1, out=src)
    return np.take_along_axis(a, src, axis=0), inside


def _fill_nan_columns(rows: np.ndarray, name: str) -> np.ndarray:
    """Boundary rows (W,) with NaN columns filled by linear interpolation (constant beyond the
    outermost segmented columns); RetinaNotFoundError when no column is segmented."""
    ok = np.isfinite(rows)
    if not ok.any():
        raise _fail(name, "the given boundaries have no segmented column")
    if ok.all():
        return rows
    x = np.arange(len(rows))
    return np.interp(x, x[ok], rows[ok])


def normalize_bscan(
    img: np.ndarray,
    s: RetinaNorm,
    spacing_y_um: float | None = None,
    spacing_x_um: float | None = None,
    name: str = "",
    boundaries: tuple[np.ndarray, np.ndarray] | None = None,
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

    ``boundaries``: ILM and BM rows (W,) to use instead of detecting them (a device's own
    segmentation, e.g. the layers of a Heidelberg ``.vol``); a NaN column (unsegmented) takes
    the value interpolated from its neighbours. The detector's failure checks do not run on
    given boundaries (they were made for detection), but a B-scan with no segmented column, or
    ILM not above BM, is refused.
    """
    a = np.asarray(img)
    if boundaries is None:
        ilm, bm, valid = detect_retina(a, s, spacing_y_um, spacing_x_um, name)
        source = "detected"
    else:
        ilm, bm = (_fill_nan_columns(np.asarray(b, np.float64), name) for b in boundaries)
        if a.ndim != 2 or ilm.shape != (a.shape[1],) or bm.shape != ilm.shape:
            raise ValueError(
                f"{name}: boundaries of shape {ilm.shape}, {bm.shape} for a scan of {a.shape}"
            )
        if np.median(bm - ilm) <= 0:
            raise _fail(name, "the given ILM lies below the given BM")
        valid = fill_mask(a) if (s.fill_white and a.dtype == np.uint8) else None
        source = "given"
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
    return NormalizedBScan(
        band, ok_out, ilm_b, bm_b, ilm, bm, shifts, top_i, rows, row_m, col_m, (h, w), source
    )
