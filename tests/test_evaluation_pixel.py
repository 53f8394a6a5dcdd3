"""Pixel-level evaluation: stitching, pixel AUROC and best Dice against hand-computed cases,
the overlay figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from anogan_lightning.evaluation import figures, stitch
from anogan_lightning.evaluation import pixel as pe


def test_stitch_averages_overlaps_and_leaves_gaps_nan():
    amaps = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])  # (2, 1, 2, 2)
    coords = torch.tensor([[0, 0, 0], [0, 1, 1]])
    maps = stitch.stitch(amaps, coords, np.array([[3, 3]]))
    expected = np.array([[1, 1, np.nan], [1, 2, 3], [np.nan, 3, 3]], dtype=np.float32)
    np.testing.assert_array_equal(maps[0], expected)


def test_stitcher_accumulates_batches_and_pads_narrow_bscans():
    s = stitch.Stitcher(np.array([[2, 4], [2, 2]]))  # the second B-scan is narrower
    s.add(np.full((1, 1, 2, 2), 5.0), np.array([[1, 0, 0]]))
    s.add(np.full((1, 2, 2), 1.0), np.array([[0, 0, 2]]))
    s.add(np.full((1, 2, 2), 3.0), np.array([[0, 0, 2]]))
    maps = s.maps()
    assert maps.shape == (2, 2, 4)
    np.testing.assert_array_equal(maps[0, :, 2:], 2.0)
    assert np.isnan(maps[0, :, :2]).all() and np.isnan(maps[1, :, 2:]).all()
    np.testing.assert_array_equal(maps[1, :, :2], 5.0)
    with pytest.raises(ValueError, match="leaves B-scan 1"):
        s.add(np.zeros((1, 2, 2)), np.array([[1, 0, 1]]))
    masks = stitch.pad_stack([None, np.ones((2, 2))], maps.shape)
    assert masks.shape == maps.shape and masks.sum() == 4 and masks[1, :, 2:].sum() == 0


def test_exact_auroc_hand_cases():
    # every (lesion, background) pair: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert pe.exact_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count half: lesion {1, 2} vs background {1, 0} -> (0.5 + 1 + 1 + 1) / 4
    assert pe.exact_auroc([1, 1, 2, 0], [1, 0, 1, 0]) == pytest.approx(0.875)
    # NaN (uncovered) pixels are left out; raw scores are not squashed by a sigmoid
    assert pe.pixel_auroc([0.1, 0.4, 0.35, 0.8, np.nan], [0, 0, 1, 1, 1]) == pytest.approx(0.75)
    assert pe.pixel_auroc(np.array([100.1, 100.4, 100.35, 100.8]) * 1e3, [0, 0, 1, 1]) == 0.75
    assert math.isnan(pe.pixel_auroc([0.1, 0.2], [0, 0]))


def test_histogram_auroc_matches_exact_within_its_bound():
    rng = np.random.default_rng(0)
    t = rng.random(20_000) < 0.1
    s = rng.normal(size=t.size) + 1.5 * t + 40.0  # large raw offset: binning handles the range
    exact = pe.exact_auroc(s, t)
    neg, pos = pe.histograms(s, t, float(s.min()), float(s.max()), 4096)
    approx, bound = pe.histogram_auroc(neg, pos)
    assert neg.sum() + pos.sum() == t.size and pos.sum() == t.sum()
    assert abs(approx - exact) <= bound + 1e-12 and bound < 1e-3
    binned = pe.pixel_auroc(s, t, exact_limit=0)  # the large-input path: 65,536 bins
    assert binned == pytest.approx(exact, abs=1e-4)
    # histograms of two halves add up to the histogram of the whole
    a = pe.histograms(s[:7000], t[:7000], float(s.min()), float(s.max()), 64)
    b = pe.histograms(s[7000:], t[7000:], float(s.min()), float(s.max()), 64)
    whole = pe.histograms(s, t, float(s.min()), float(s.max()), 64)
    np.testing.assert_array_equal(a[0] + b[0], whole[0])
    np.testing.assert_array_equal(a[1] + b[1], whole[1])


def test_best_dice_hand_case_exact_and_binned():
    # t=0.9: 2/3; t=0.8: 2/4; t=0.3: TP 2, FP 1 -> 4/5; t=0.2: 4/6
    s, t = [0.9, 0.8, 0.3, 0.2], [1, 0, 1, 0]
    dice, thr = pe.best_dice(s, t)
    assert dice == pytest.approx(0.8) and thr == pytest.approx(0.3)
    dice_b, thr_b = pe.best_dice(s, t, exact_limit=0, n_bins=700)
    assert dice_b == pytest.approx(0.8) and 0.2 < thr_b <= 0.3
    assert pe.best_dice([0.5, 0.5], [1, 1]) == (1.0, 0.5)
    assert math.isnan(pe.best_dice([0.1, 0.2], [0, 0])[0])


def test_pixel_metrics_keys_and_perfect_map():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 1:3, 1:3] = 1
    maps = masks.astype(np.float32) * 2.0 + 0.5
    maps[1, :, 3] = np.nan  # uncovered column: not counted
    out = pe.pixel_metrics(maps, masks, "test")
    assert out["test/pixel_auroc"] == 1.0 and out["test/pixel_best_dice"] == 1.0
    assert out["test/pixel_best_dice_threshold"] == 2.5
    assert out["test/pixel_count"] == 28 and out["test/pixel_lesion_count"] == 4
    with pytest.raises(ValueError, match="differ in shape"):
        pe.pixel_metrics(maps[:1], masks)


def test_overlay_pngs(tmp_path):
    image = np.linspace(-1, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    amap = np.full((40, 60), np.nan, np.float32)
    amap[:, :32] = np.linspace(0, 1, 32)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:20] = 1
    path = figures.save_overlay(tmp_path / "one.png", image, amap, mask, title="vol:b0")
    with Image.open(path) as im:
        assert im.size[0] > im.size[1] > 0
    maps = np.stack([amap, amap, amap])
    masks = stitch.pad_stack([None, mask, mask * 0], maps.shape)
    drawn = []

    def image_of(i: int) -> np.ndarray:
        drawn.append(i)
        return image

    ids = ["a:b0", "b:b1", "c:b2"]
    paths = figures.write_overlays(tmp_path / "maps", maps, masks, image_of, ids, n=2)
    assert [p.name for p in paths] == ["bscan_00_b_b1.png", "bscan_01_a_b0.png"]  # lesion first
    assert drawn == [1, 0] and all(p.is_file() for p in paths)
    files = ["scans/x.png", "scans/y.JPEG", "scans/z.png"]  # 2-D B-scans: no doubled suffix
    paths = figures.write_overlays(tmp_path / "files", maps, masks, image_of, files, n=2)
    assert [p.name for p in paths] == ["bscan_00_y.png", "bscan_01_x.png"]


@pytest.fixture
def fast_bincount():
    """torchmetrics' binned metrics under torch's deterministic mode (which a training run
    earlier in the same process switches on: trainer.deterministic) count with a one-hot
    matrix of N x 4 n^2 entries (42 GB for the test below): compare with its bincount."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def test_binned_and_exact_metrics_match_torchmetrics_on_unit_range_scores(fast_bincount):
    """The hand-written metrics give torchmetrics' results where torchmetrics applies: scores
    inside [0, 1] (it passes others through a sigmoid), thresholds at our bin edges. Why
    evaluation.pixel keeps its own code is in its module docstring; the raw-score case is below."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(0)
    t = rng.random(20_000) < 0.1
    s = rng.normal(size=t.size) + 1.5 * t
    s = 0.1 + 0.8 * (s - s.min()) / (s.max() - s.min())  # inside [0, 1]
    scores, target = torch.tensor(s), torch.tensor(t.astype(np.int64))
    lo, hi, n = float(s.min()), float(s.max()), 256
    edges = torch.tensor(lo + np.arange(n) * (hi - lo) / n)  # the lower edges of our bins

    binned, _ = pe.histogram_auroc(*pe.histograms(s, t, lo, hi, n))
    assert binned == pytest.approx(
        float(tm.binary_auroc(scores, target, thresholds=edges)), abs=1e-6
    )
    assert pe.exact_auroc(s, t) == pytest.approx(float(tm.binary_auroc(scores, target)), abs=1e-6)

    def tm_best_dice(thresholds):
        p, r, thr = tm.binary_precision_recall_curve(scores, target, thresholds=thresholds)
        dice = (2 * p * r / (p + r)).nan_to_num(0.0)[:-1]  # the last point is (P=1, R=0)
        k = int(dice.argmax())
        return float(dice[k]), float(thr[k])

    for ours, theirs in ((pe.best_dice(s, t, exact_limit=0, n_bins=n), tm_best_dice(edges)),
                         (pe.best_dice(s, t), tm_best_dice(None))):  # fmt: skip
        assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
        assert ours[1] == pytest.approx(theirs[1], abs=1e-9)

    raw = 100.0 + 10.0 * s  # raw anomaly scores, as a method gives them
    assert pe.pixel_auroc(raw, t) == pytest.approx(pe.exact_auroc(s, t))
    assert float(tm.binary_auroc(torch.tensor(raw), target)) == 0.5  # sigmoid: all ties


def test_stitcher_matches_fold_on_a_stride_lattice():
    """On patches whose corners lie on a stride lattice, the Stitcher's mean equals
    torch.nn.functional.fold's sum of blocks over its count of blocks."""
    rng = np.random.default_rng(1)
    h, w, size, stride = 10, 12, 4, 2
    ys, xs = np.arange(0, h - size + 1, stride), np.arange(0, w - size + 1, stride)
    corners = np.array([(y, x) for y in ys for x in xs])
    present = rng.random(len(corners)) < 0.7  # the grid keeps only patches touching the retina
    amaps = rng.random((len(corners), size, size)).astype(np.float32)

    s = stitch.Stitcher(np.array([[h, w]]))
    keep = np.flatnonzero(present)
    s.add(amaps[keep], np.c_[np.zeros(len(keep), np.int64), corners[keep]])

    blocks = torch.from_numpy(amaps * present[:, None, None]).reshape(1, len(corners), -1)
    ones = torch.from_numpy(np.ones_like(amaps) * present[:, None, None]).reshape(blocks.shape)
    fold = dict(output_size=(h, w), kernel_size=size, stride=stride)
    total = torch.nn.functional.fold(blocks.transpose(1, 2), **fold)[0, 0]
    count = torch.nn.functional.fold(ones.transpose(1, 2), **fold)[0, 0]
    expected = torch.where(count > 0, total / count, torch.nan).numpy()
    np.testing.assert_allclose(s.maps()[0], expected, rtol=1e-6, equal_nan=True)
