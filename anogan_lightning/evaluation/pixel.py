"""Pixel-level metrics where lesion masks exist: pixel AUROC, best Dice, AUPRO.

The maps are those of :mod:`anogan_lightning.evaluation.stitch` (patch or window maps placed
back into their B-scans; pixels no patch covers are NaN and left out of every metric). Scores
stay raw (no sigmoid, no min-max per test set).

Metrics pool all covered pixels of the split:

- pixel AUROC: the Mann-Whitney statistic with tied scores counted half, computed exactly from
  ranks when there are at most ``exact_limit`` pixels (default 4M; 16 bytes per pixel), else
  from per-class histograms of ``n_bins`` (default 65,536) equal-width bins over the score
  range: memory O(n_bins) however many pixels, pixels in one bin counted as ties. The error this
  adds is at most half the fraction of (lesion, background) pairs that share a bin;
  :func:`histogram_auroc` returns that bound.
- best Dice: max over thresholds t of 2·TP / (2·TP + FP + FN) with lesion = score >= t, the
  dataset-level Dice of Baur et al. (2021); exact over every distinct score or over bin edges.

Own code, not torchmetrics (tests/test_evaluation_pixel.py checks both give the same numbers
where torchmetrics applies): torchmetrics (1.x) passes scores outside [0, 1] through a sigmoid,
so raw anomaly scores saturate into ties (AUROC 0.5 on scores near 100), and with thresholds its
curves loop over them once the input exceeds 50k values, O(pixels × bins) against the
histograms' O(pixels); it also returns float32.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from torch import Tensor

EXACT_LIMIT = 4_000_000
N_BINS = 65_536


def as_numpy(a) -> np.ndarray:
    """A tensor (any device, dtype) or array-like as a numpy array (tensors as float32)."""
    if isinstance(a, Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


def _pixels(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Flattened covered pixels: (scores float64, targets bool); NaN scores dropped."""
    s = as_numpy(scores).astype(np.float64).ravel()
    t = as_numpy(targets).ravel() != 0
    if s.shape != t.shape:
        raise ValueError(f"{s.size} scores for {t.size} mask pixels")
    keep = ~np.isnan(s)
    s, t = s[keep], t[keep]
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} infinite pixel scores")
    return s, t


def _both(t: np.ndarray) -> bool:
    return bool(t.any() and (~t).any())


def exact_auroc(scores, targets) -> float:
    """Exact AUROC (ties count half) of covered pixels; NaN without both classes."""
    s, t = _pixels(scores, targets)
    if not _both(t):
        return math.nan
    ranks = rankdata(s)  # average ranks: ties half
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def histograms(
    scores, targets, lo: float, hi: float, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts (background, lesion), each (n_bins,) int64, of equal-width bins
    over [lo, hi]; accumulate them over batches with ``+``."""
    s, t = _pixels(scores, targets)
    width = (hi - lo) / n_bins if hi > lo else 1.0
    idx = np.clip(((s - lo) / width).astype(np.int64), 0, n_bins - 1)
    neg = np.bincount(idx[~t], minlength=n_bins)
    pos = np.bincount(idx[t], minlength=n_bins)
    return neg, pos


def histogram_auroc(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float]:
    """(AUROC, bound on its binning error) from per-class bin counts; pairs within a bin are
    counted as ties."""
    neg, pos = neg.astype(np.float64), pos.astype(np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return math.nan, 0.0
    neg_below = np.cumsum(neg) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    same_bin = (pos * neg).sum()
    return float(wins / (n_pos * n_neg)), float(0.5 * same_bin / (n_pos * n_neg))


def pixel_auroc(scores, targets, exact_limit: int = EXACT_LIMIT, n_bins: int = N_BINS) -> float:
    """Pixel AUROC of covered pixels: exact up to ``exact_limit`` pixels, else binned."""
    s, t = _pixels(scores, targets)
    if not _both(t):
        return math.nan
    if len(s) <= exact_limit:
        return exact_auroc(s, t)
    neg, pos = histograms(s, t, float(s.min()), float(s.max()), n_bins)
    return histogram_auroc(neg, pos)[0]


def _dice_curve(tp: np.ndarray, fp: np.ndarray, n_pos: int) -> np.ndarray:
    return 2 * tp / np.maximum(tp + fp + n_pos, 1)  # 2TP / (2TP + FP + FN), FN = P - TP


def best_dice(
    scores, targets, exact_limit: int = EXACT_LIMIT, n_bins: int = N_BINS
) -> tuple[float, float]:
    """(best Dice, its threshold t) over lesion = score >= t; exact over distinct scores up to
    ``exact_limit`` pixels, else over the lower edges of ``n_bins`` bins. NaN without lesions."""
    s, t = _pixels(scores, targets)
    n_pos = int(t.sum())
    if n_pos == 0 or len(s) == 0:
        return math.nan, math.nan
    if len(s) <= exact_limit:
        order = np.argsort(-s, kind="stable")
        s_sorted, t_sorted = s[order], t[order]
        tp = np.cumsum(t_sorted)
        fp = np.cumsum(~t_sorted)
        last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last index of each distinct score
        dice = _dice_curve(tp[last], fp[last], n_pos)
        k = int(np.argmax(dice))
        return float(dice[k]), float(s_sorted[last][k])
    lo, hi = float(s.min()), float(s.max())
    neg, pos = histograms(s, t, lo, hi, n_bins)
    tp = np.cumsum(pos[::-1])[::-1]  # pixels in bins >= b
    fp = np.cumsum(neg[::-1])[::-1]
    dice = _dice_curve(tp.astype(np.float64), fp.astype(np.float64), n_pos)
    k = int(np.argmax(dice))
    return float(dice[k]), lo + k * (hi - lo) / n_bins


def aupro(maps, masks, fpr_limit: float = 0.3, n_steps: int = 200) -> tuple[float, int]:
    """(AUPRO, number of regions): the area under the per-region overlap curve up to a
    background false-positive rate of ``fpr_limit``, divided by ``fpr_limit`` (Bergmann et al.,
    MVTec AD, CVPR 2019 / IJCV 2021). A region is a connected lesion component (8-connected) of
    one image's mask; its overlap at threshold t is the fraction of its covered pixels scoring
    >= t, and the curve averages regions, so a small fluid pocket counts as much as a large one.
    maps (n, H, W) with NaN = uncovered; masks of the same shape. NaN without regions."""
    from scipy.ndimage import label

    maps, masks = as_numpy(maps).astype(np.float64), as_numpy(masks) != 0
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    covered = ~np.isnan(maps)
    bg = np.sort(maps[covered & ~masks])[::-1]
    regions = []
    for m, a, c in zip(masks, maps, covered, strict=True):
        lab, n = label(m & c, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            regions.append(np.sort(a[lab == k]))
    if not regions or not len(bg):
        return math.nan, len(regions)
    # candidate thresholds: background quantiles at nominal FPRs up to the limit, then the
    # actual FPR of each (ties make it jump), the curve cut at the limit by interpolation
    nominal = np.linspace(0.0, fpr_limit, n_steps + 1)[1:]
    q = bg[np.minimum((nominal * len(bg)).astype(np.int64), len(bg) - 1)]
    # each quantile and the value just above it: a tied block of background scores is either
    # all above the threshold or all below
    t = np.unique(np.r_[np.inf, q, np.nextafter(q, np.inf)])[::-1]  # descending: FPR rises
    asc = bg[::-1]
    fpr = (len(bg) - np.searchsorted(asc, t, side="left")) / len(bg)  # P(background >= t)
    pro = np.zeros(len(t))
    for r in regions:
        pro += (len(r) - np.searchsorted(r, t, side="left")) / len(r)
    pro /= len(regions)
    inside = fpr <= fpr_limit
    f, p = fpr[inside], pro[inside]
    if not inside.all():  # the segment that crosses the limit, interpolated at it
        j = int(np.argmax(~inside))
        w = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        f = np.r_[f, fpr_limit]
        p = np.r_[p, pro[j - 1] + w * (pro[j] - pro[j - 1])]
    area = float(((p[1:] + p[:-1]) * 0.5 * np.diff(f)).sum())  # trapezoids
    return area / fpr_limit, len(regions)


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, prefix: str = "test") -> dict[str, float]:
    """``{prefix}/pixel_auroc``, ``{prefix}/pixel_best_dice``, ``..._threshold``,
    ``{prefix}/pixel_aupro`` (per-region overlap up to 30% FPR, :func:`aupro`), the region count
    and the covered pixel count from stitched maps (NaN = uncovered) and masks of the same
    shape."""
    maps, masks = as_numpy(maps), as_numpy(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    dice, threshold = best_dice(maps, masks)
    covered = ~np.isnan(maps)
    pro, n_regions = aupro(maps, masks)
    return {
        f"{prefix}/pixel_auroc": pixel_auroc(maps, masks),
        f"{prefix}/pixel_best_dice": dice,
        f"{prefix}/pixel_best_dice_threshold": threshold,
        f"{prefix}/pixel_aupro": pro,
        f"{prefix}/pixel_regions": float(n_regions),
        f"{prefix}/pixel_count": float(covered.sum()),
        f"{prefix}/pixel_lesion_count": float((masks[covered] != 0).sum()),
    }
