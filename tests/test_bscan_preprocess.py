"""Retina-normalised B-scans (retina.normalize.normalize_bscan): geometry on phantoms with known
boundaries, every switch, the per-scan failure checks, masks, the min-cost path against
skimage.graph, and Bruch's membrane on the real Spectralis volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anogan_lightning.data.retina.normalize import (
    RetinaNorm,
    flatten_mode,
    normalize_bscan,
    smooth_reference,
)
from anogan_lightning.data.retina.segment import RetinaNotFoundError, fill_mask, min_cost_path


def settings(**kw) -> RetinaNorm:
    """The phantoms' settings: rows of unknown spacing (detection lengths scaled by the row
    count, 496 = the reference), half the columns kept; ``kw`` on top."""
    return RetinaNorm(**{"spacing_y_um": None, "x_scale": 0.5, **kw})


SHARED = Path(__file__).resolve().parents[2] / "shared/data"
SPECTRALIS = SHARED / "spectralis-volume"


def phantom(
    h: int = 496,
    w: int = 768,
    seed: int = 0,
    tilt: float = 40.0,
    top: float = 180.0,
    bump: float = 0.0,
):
    """uint8 B-scan: dark vitreous, a retina from ILM to a bright RPE ending at BM, a dimmer
    choroid; ``bump`` rows of RPE elevation (a detachment) around u = 0.4; returns (image,
    ilm, bm) with the true rows per column."""
    rng = np.random.default_rng(seed)
    u = np.linspace(-1, 1, w)
    bm = top + 120 + tilt * u + 30 * u**2 - bump * np.exp(-(((u - 0.4) / 0.08) ** 2))
    ilm = bm - 110 + 45 * np.exp(-((u / 0.15) ** 2))  # a foveal pit
    r = np.arange(h)[:, None]
    img = np.full((h, w), 20.0)
    retina = (r >= ilm) & (r < bm)
    img = np.where(retina, 90 + 60 * (r - ilm < 12), img)  # bright RNFL under the ILM
    img = np.where((r >= bm - 14) & (r < bm), 230, img)  # RPE band, BM its lower edge
    img = np.where(r >= bm, 70, img)
    img = img * rng.gamma(6, 1 / 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ilm, bm


def test_normalize_bscan_shape_range_and_boundaries():
    img, ilm, bm = phantom()
    s = settings(height=64, x_scale=0.5)
    r = normalize_bscan(img, s, name="phantom")
    assert r.band.shape == (64, 384) and r.band.dtype == np.float32
    assert r.band.min() >= -1 and r.band.max() <= 1 and r.valid.all()
    assert np.abs(r.bm_in - (bm - 1)).mean() < 1.5  # BM: the last RPE row
    assert np.abs(r.ilm_in - ilm).mean() < 2.5
    # flattened: BM on one row of the band; the anatomy band puts margins around the retina
    assert np.ptp(r.bm) < 1.0
    assert 40 < r.bm.mean() < 60 and r.ilm.min() > 2
    # the RPE is the brightest row band, just above BM
    row_means = r.band.mean(axis=1)
    assert abs(int(np.argmax(row_means)) - r.bm.mean()) < 4


def test_normalize_bscan_switches():
    img, _, _ = phantom(tilt=60)
    flat = normalize_bscan(img, settings(flatten=True))
    curved = normalize_bscan(img, settings(flatten=False))
    assert np.ptp(flat.bm) < 1 < np.ptp(curved.bm)
    # depth band: fixed physical depth, needs the row spacing
    with pytest.raises(ValueError, match="spacing_y_um"):
        normalize_bscan(img, settings(band="depth"))
    d = normalize_bscan(img, settings(band="depth", depth_um=400, below_bm_um=100), 4.0)
    assert d.rows in (125, 126, 127)  # (400 + 100) / 4 rows before the resample to 64
    frame = normalize_bscan(img, settings(band="frame", flatten=False, height=124))
    assert frame.rows == 496 and frame.band.shape[0] == 124
    # fixed lateral pixel size: from the spacings when known, else x_scale
    sp = normalize_bscan(img, settings(target_spacing_x_um=22.0), spacing_x_um=11.0)
    assert sp.band.shape[1] == 384
    assert normalize_bscan(img, settings(x_scale=0.25)).band.shape[1] == 192
    raw = normalize_bscan(img, settings(intensity_percentiles=None))
    assert raw.band.min() > -1 and raw.band.max() < 1  # no stretch: uint8 to [-1, 1] only
    with pytest.raises(ValueError, match="band="):
        RetinaNorm(band="middle")


def test_smooth_flattening_keeps_local_bm_deformations():
    # tilt and curvature go (a polynomial through BM), an RPE elevation over a fraction of the
    # width stays; flattening on BM itself straightens the elevation away
    img, _, bm_true = phantom(tilt=60, bump=30)
    ref = smooth_reference(bm_true, 2)
    base = 180 + 120 + 60 * np.linspace(-1, 1, 768) + 30 * np.linspace(-1, 1, 768) ** 2
    assert np.abs(ref - base).max() < 1.5  # the robust fit ignores the elevation
    smooth = normalize_bscan(img, settings(flatten="smooth", x_scale=1.0))
    exact = normalize_bscan(img, settings(flatten=True, x_scale=1.0))
    scale = 64 / smooth.rows  # band rows per input row
    peak = int(np.argmin(smooth.bm))
    assert abs(peak / 767 * 2 - 1 - 0.4) < 0.05
    lift = np.median(smooth.bm) - smooth.bm.min()
    assert abs(lift - 30 * scale) < 3  # the elevation in band rows
    away = np.abs(np.linspace(-1, 1, 768) - 0.4) > 0.3
    assert np.ptp(smooth.bm[away]) < 2.5  # but no tilt or curvature
    assert np.ptp(exact.bm) < 1.0
    with pytest.raises(ValueError, match="flatten"):
        RetinaNorm(flatten="poly")
    assert flatten_mode(True) == "bm" and flatten_mode(False) == "none"


def test_failures_name_the_file():
    rng = np.random.default_rng(0)
    with pytest.raises(RetinaNotFoundError, match="blank.png: constant"):
        normalize_bscan(np.full((496, 512), 40, np.uint8), settings(), name="blank.png")
    noise = rng.integers(0, 255, size=(496, 512)).astype(np.uint8)
    with pytest.raises(
        RetinaNotFoundError, match="noise.png: (no retina found|boundaries off the frame)"
    ):
        normalize_bscan(noise, settings(), name="noise.png")
    low, _, _ = phantom(top=380, tilt=0)  # BM at and beyond the bottom of the frame
    with pytest.raises(RetinaNotFoundError, match="low.png: boundaries off the frame"):
        normalize_bscan(low, settings(), name="low.png")
    fill = phantom()[0]
    fill[:400] = 255
    with pytest.raises(RetinaNotFoundError, match="registration fill"):
        normalize_bscan(fill, settings(), name="fill.png")
    # the checks are a switch: off, the same noise passes (for debugging, not for training)
    assert normalize_bscan(noise, settings(check=False)).band.shape[0] == 64


def test_registration_fill_becomes_background():
    img, _, _ = phantom()
    img[:60, :200] = 255  # a white wedge in the vitreous
    r = normalize_bscan(img, settings())
    clean = normalize_bscan(phantom()[0], settings())
    assert np.abs(r.bm_in - clean.bm_in).mean() < 1
    assert r.band.max() == 1.0 and (r.band[:5, :50] < 0).all()  # not white


def test_mask_follows_the_band():
    img, ilm, bm = phantom()
    rows = np.arange(img.shape[0])[:, None]
    mask = ((rows > ilm + 30) & (rows < ilm + 60)).astype(np.uint8)  # a layer inside the retina
    r = normalize_bscan(img, settings())
    m = r.apply(mask)
    assert m.shape == r.band.shape and m.dtype == np.uint8 and m.any()
    ys, xs = np.nonzero(m)
    assert (ys > r.ilm[xs] - 1).all() and (ys < r.bm[xs]).all()
    # lesion area scales with the band's rows and columns
    expected = mask.sum() * (r.band.shape[0] / r.rows) * (r.band.shape[1] / img.shape[1])
    assert abs(m.sum() / expected - 1) < 0.15


def test_fill_mask_matches_the_cumulative_product_definition():
    rng = np.random.default_rng(1)
    img = rng.choice(np.array([0, 100, 252, 255], np.uint8), size=(40, 30), p=[0.2, 0.2, 0.3, 0.3])
    img[:, 3] = 255
    white = img >= 250
    top = np.cumprod(white, axis=0).astype(bool)
    bottom = np.cumprod(white[::-1], axis=0)[::-1].astype(bool)
    for run in (1, 3):
        t = top & (top.sum(axis=0, keepdims=True) >= run)
        b = bottom & (bottom.sum(axis=0, keepdims=True) >= run)
        ref = ~(t | b | (white.mean(axis=0, keepdims=True) > 0.9))
        np.testing.assert_array_equal(fill_mask(img, 250, run), ref)


def test_min_cost_path_equals_skimage_mcp():
    from skimage.graph import MCP

    rng = np.random.default_rng(0)
    cost = rng.random((60, 80)).astype(np.float32)
    ours = min_cost_path(cost, max_jump=2, jump_penalty=0.0)
    mcp = MCP(cost.astype(np.float64), offsets=[(d, 1) for d in range(-2, 3)])
    ends = [(i, 79) for i in range(60)]
    cum, _ = mcp.find_costs([(i, 0) for i in range(60)], ends, find_all_ends=True)
    path = np.array([p[0] for p in mcp.traceback(min(ends, key=lambda e: cum[e]))])
    cols = np.arange(80)
    assert np.isclose(cost[ours, cols].sum(), cost[path, cols].sum(), rtol=1e-5)
    assert (np.abs(np.diff(ours)) <= 2).all()
    # batched = one by one, and a jump penalty straightens the path
    many = min_cost_path(np.stack([cost, cost[::-1]]), 2, 0.0)
    np.testing.assert_array_equal(many[0], ours)
    smooth = min_cost_path(cost, 2, 1.0)
    assert np.abs(np.diff(smooth)).sum() < np.abs(np.diff(ours)).sum()


@pytest.mark.skipif(not SPECTRALIS.is_dir(), reason=f"{SPECTRALIS} not present")
def test_spectralis_volume_bruchs_membrane():
    """Read as a volume (multi-page TIFF, spacing given as the config would) and compare BM with
    the manual boundary of layers.npz."""
    from anogan_lightning.data.readers import read_volume

    vol = read_volume(SPECTRALIS / "volume.tif")
    truth = np.load(SPECTRALIS / "layers.npz")
    if "bm" not in truth.files:
        pytest.skip("layers.npz has no 'bm'")
    gt = truth["bm"]
    s = RetinaNorm(spacing_y_um=3.87, spacing_x_um=11.18, target_spacing_x_um=11.18)
    errors = []
    for b, bscan in enumerate(vol.data):
        r = normalize_bscan(bscan, s, name=f"volume.tif:b{b}")
        assert r.band.shape == (64, bscan.shape[1])
        errors.append(np.abs(r.bm_in - gt[b]))
    e = np.concatenate(errors)
    e = e[~np.isnan(e)]
    assert e.mean() <= 1.5, f"mean BM error {e.mean():.2f} rows"
    assert np.median(e) <= 1.5
