"""Volume preprocessing, one function at a time: intensities, x-resampling, boundary detection on
phantoms with known boundaries, flattening and cropping, patch positions and labels, and the
2-D flattening of real Kermany B-scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anogan_lightning.data.retina.normalize import (
    flatten_bscan,
    flatten_crop,
    normalize_intensity,
    resample_mask_x,
    resample_matrix,
    resample_x,
    shift_columns,
)
from anogan_lightning.data.retina.patches import (
    extract_patches,
    grid_patch_positions,
    patch_labels,
    random_patch_positions,
)
from anogan_lightning.data.retina.segment import (
    BoundaryParams,
    detect_boundaries,
    fill_mask,
    min_cost_path,
)
from anogan_lightning.data.synthetic_volume import SPACING_UM, make_volume

MINI = Path(__file__).resolve().parents[2] / "shared/data/kermany-mini"


# ---------------------------------------------------------------- intensities and resampling


def test_normalize_intensity_percentiles_to_unit_range():
    v = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    out = normalize_intensity(v, (10.0, 90.0))
    assert out.dtype == np.float32 and out.shape == v.shape
    assert out.min() == -1.0 and out.max() == 1.0
    lo, hi = np.percentile(v[..., ::2, ::2], [10, 90])
    np.testing.assert_allclose(out[v == 500], (500 - lo) / (hi - lo) * 2 - 1, atol=1e-6)
    assert (out[v <= lo] == -1).all() and (out[v >= hi] == 1).all()
    assert (normalize_intensity(np.full((2, 4, 4), 7)) == -1).all()  # constant volume


def test_resample_matrix_area_and_linear():
    m = resample_matrix(4, 2)
    np.testing.assert_allclose(np.arange(4.0) @ m, [0.5, 2.5])
    m = resample_matrix(3, 2)  # output 0 covers input [0, 1.5): (x0 + 0.5 x1) / 1.5
    np.testing.assert_allclose(np.array([3.0, 6.0, 9.0]) @ m, [4.0, 8.0], rtol=1e-6)
    for n_in, n_out in ((512, 268), (256, 134), (100, 250)):
        np.testing.assert_allclose(resample_matrix(n_in, n_out).sum(0), 1.0, rtol=1e-5)
    up = np.array([0.0, 2.0]) @ resample_matrix(2, 4)  # linear between pixel centres
    np.testing.assert_allclose(up, [0.0, 0.5, 1.5, 2.0])


def test_resample_x_width_from_spacing():
    b = np.random.default_rng(0).random((3, 8, 512)).astype(np.float32)
    out = resample_x(b, 11.5, 22.0)
    assert out.shape == (3, 8, 268)  # 512 columns * 11.5 / 22 = 267.6
    np.testing.assert_array_equal(resample_x(b, 22.0, 22.0), b)  # same spacing: unchanged
    np.testing.assert_allclose(out.mean(), b.mean(), atol=2e-3)  # area weights keep the mean
    ramp = np.tile(np.arange(512, dtype=np.float32), (1, 2, 1))
    assert np.all(np.diff(resample_x(ramp, 11.5, 22.0)[0, 0]) > 0)
    mask = np.zeros((1, 2, 8), np.uint8)
    mask[..., 2:4] = 1  # two aligned columns -> one column at half the resolution
    np.testing.assert_array_equal(resample_mask_x(mask, 4)[0, 0], [0, 1, 0, 0])


# ---------------------------------------------------------------- boundaries


def test_min_cost_path_follows_cheap_pixels_within_jump_limit():
    cost = np.ones((1, 10, 6), np.float32)
    rows = [2, 3, 4, 8, 7, 6]  # 4 -> 8 jumps 4 rows
    cost[0, rows, np.arange(6)] = 0
    np.testing.assert_array_equal(min_cost_path(cost, max_jump=4)[0], rows)
    limited = min_cost_path(cost, max_jump=1)[0]
    assert np.abs(np.diff(limited)).max() <= 1
    allowed = np.ones_like(cost, bool)
    allowed[0, 7:] = False  # forbidden rows are avoided
    assert min_cost_path(cost, max_jump=4, allowed=allowed)[0].max() < 7
    assert min_cost_path(cost[0], max_jump=4).shape == (6,)  # 2-D in, 1-D out


@pytest.mark.parametrize("looks", [4.0, 1.5])  # default speckle and much heavier speckle
def test_boundaries_on_phantoms_within_two_pixels(looks: float):
    """Phantom volumes with known ILM/BM, through normalisation and x-resampling first."""
    for index, diseased in ((0, False), (1, True)):
        vol = make_volume(3, "test", index, diseased, speckle_looks=looks)
        x = resample_x(normalize_intensity(vol.volume), SPACING_UM[2], 22.0)
        m = resample_matrix(vol.volume.shape[2], x.shape[2])
        params = BoundaryParams().scaled(rows=x.shape[1] / 496, cols=SPACING_UM[2] / 22.0)
        ilm, bm = detect_boundaries(x, params)
        assert ilm.shape == bm.shape == (16, x.shape[2])
        err_ilm, err_bm = np.abs(ilm - vol.ilm @ m), np.abs(bm - vol.bm @ m)
        assert err_ilm.mean() <= 2.0 and err_bm.mean() <= 2.0, (vol.lesions, err_ilm, err_bm)
        assert np.median(err_ilm) <= 1.0 and np.median(err_bm) <= 1.0
        assert (ilm < bm).all()


def test_flatten_crop_puts_bm_on_one_row():
    vol = make_volume(0, "train", 0, False, shape=(4, 128, 256))
    x = normalize_intensity(vol.volume)
    ilm, bm = detect_boundaries(x, BoundaryParams().scaled(rows=128 / 496))
    band, ilm_b, bm_b, shifts = flatten_crop(x, ilm, bm, height=64, below=8)
    assert band.shape == (4, 64, 256)
    assert (bm_b == 64 - 1 - 8).all() and np.array_equal(ilm_b, ilm - shifts)
    b, c = 2, 100
    np.testing.assert_array_equal(
        band[b, :, c], x[b, np.clip(np.arange(64) + shifts[b, c], 0, 127), c]
    )
    flat = flatten_crop(x, ilm, bm, 64, 8, flatten=False)
    assert (np.ptp(flat[3], axis=1) == 0).all()  # one shift per B-scan: the curvature stays
    with pytest.raises(ValueError, match="below=64"):
        flatten_crop(x, ilm, bm, 64, 64)


def test_shift_columns_repeats_edge_rows():
    a = np.arange(12).reshape(4, 3)
    out = shift_columns(a, np.array([-1, 0, 3]), 4)
    np.testing.assert_array_equal(out[:, 0], [0, 0, 3, 6])
    np.testing.assert_array_equal(out[:, 1], [1, 4, 7, 10])
    np.testing.assert_array_equal(out[:, 2], [11, 11, 11, 11])


# ---------------------------------------------------------------- patches


def test_random_patch_positions_centre_inside_retina():
    w, h, s = 120, 64, 16
    ilm = np.full(w, 20) + (np.arange(w) % 7)
    bm = np.full(w, 55)
    rng = np.random.default_rng(0)
    pos = random_patch_positions(ilm, bm, h, s, 500, rng)
    assert pos.shape == (500, 2) and pos.dtype == np.int64
    y, x = pos[:, 0], pos[:, 1]
    assert (y >= 0).all() and (y + s <= h).all() and (x >= 0).all() and (x + s <= w).all()
    yc, xc = y + s // 2, x + s // 2
    assert (yc >= ilm[xc]).all() and (yc <= bm[xc]).all()
    assert len(np.unique(pos, axis=0)) > 300
    again = random_patch_positions(ilm, bm, h, s, 500, np.random.default_rng(0))
    np.testing.assert_array_equal(pos, again)
    with pytest.raises(ValueError, match="does not fit"):
        random_patch_positions(ilm, bm, 8, s, 1, rng)


def test_grid_positions_cover_the_retina():
    w, h, s = 70, 64, 32
    ilm, bm = np.full(w, 40), np.full(w, 55)  # retina only in the lower patch row
    pos = grid_patch_positions(ilm, bm, h, s, stride=32)
    # x: 0, 32 and 38 (the last flush with the edge); y: 0 dropped (no retina), 32 kept
    np.testing.assert_array_equal(pos, [[32, 0], [32, 32], [32, 38]])
    ilm[:] = 10
    pos = grid_patch_positions(ilm, bm, h, s, stride=16)
    assert len(pos) == 3 * 4 and pos[:, 0].max() == 32 and pos[:, 1].max() == 38


def test_patch_labels_any_mask_pixel():
    mask = np.zeros((8, 8), np.uint8)
    mask[5, 6] = 1
    pos = np.array([[0, 0], [4, 4], [3, 4], [5, 0], [4, 7]])
    np.testing.assert_array_equal(patch_labels(mask, pos[:4], 3), [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"\(4, 7\)"):
        patch_labels(mask, pos, 3)  # [4, 7] + 3 leaves the 8x8 image
    patches = extract_patches(np.arange(64).reshape(8, 8), pos[:2], 3)
    np.testing.assert_array_equal(patches[1], np.arange(64).reshape(8, 8)[4:7, 4:7])


# ---------------------------------------------------------------- 2-D flattening


def test_flatten_bscan_straightens_a_tilted_phantom():
    vol = make_volume(5, "train", 0, False, shape=(1, 248, 384))
    img = vol.volume[0]
    tilt = np.round(np.linspace(-20, 20, img.shape[1])).astype(int)
    tilted = shift_columns(img, tilt, img.shape[0])  # a tilted retina
    out, bm = flatten_bscan(tilted, return_bm=True)
    assert out.shape == tilted.shape and out.dtype == np.uint8
    err = np.abs(bm - (vol.bm[0] - tilt))
    assert err.mean() <= 1.0 and np.percentile(err, 95) <= 2.5
    _, bm_after = flatten_bscan(out, return_bm=True)
    assert np.ptp(bm_after) <= 2


def _kermany_sample() -> list[Path]:
    """A seeded sample of 6 NORMAL scans of kermany-mini (several widths)."""
    paths = sorted(MINI.glob("*/NORMAL/*"))
    rng = np.random.default_rng(2024)
    return [paths[i] for i in sorted(rng.choice(len(paths), 6, replace=False))]


@pytest.mark.skipif(not MINI.is_dir(), reason=f"kermany-mini sample not found at {MINI}")
def test_flatten_real_kermany_bscans(tmp_path: Path):
    """After flattening, the re-detected BM varies by <= 2 px over 95% of the image columns.

    Columns of the white registration fill do not count; the outer 5% leave room for the optic
    disc edge and vessel shadows, where there is no BM to find. Before/after PNGs (BM in green)
    go to the test's temp dir for inspection.
    """
    for path in _kermany_sample():
        img = np.asarray(Image.open(path).convert("L"))
        out, bm = flatten_bscan(img, return_bm=True)
        _, bm_after = flatten_bscan(out, return_bm=True)
        valid = fill_mask(out).mean(axis=0) > 0.5
        lo, hi = np.percentile(bm_after[valid], [2.5, 97.5])
        for name, a, rows in (("before", img, bm), ("after", out, bm_after)):
            rgb = np.stack([a] * 3, axis=-1)
            rgb[rows, np.arange(a.shape[1])] = (0, 255, 0)
            Image.fromarray(rgb).save(tmp_path / f"{path.stem}_{name}.png")
        assert hi - lo <= 2, f"{path}: flattened BM spans rows {lo}..{hi}"
        assert np.ptp(bm) > np.ptp(bm_after[valid])  # it was not flat before
    assert len(list(tmp_path.glob("*_after.png"))) == 6
