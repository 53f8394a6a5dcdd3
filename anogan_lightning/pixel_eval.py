"""Pixel-level evaluation where lesion masks exist: stitching, pixel AUROC, best Dice, figures.

Patch anomaly maps (B, 1, h, w) are placed back into their B-scans by the patch coordinates
(B-scan index, y, x) that :class:`anogan_lightning.data.patch_dataset.PatchDataset` gives every
patch; overlapping patches are averaged, pixels no patch covers are NaN and left out of every
metric. Scores stay raw (no sigmoid, no min-max per test set).

Metrics pool all covered pixels of the split:

- pixel AUROC: the Mann-Whitney statistic with tied scores counted half, computed exactly from
  ranks when there are at most ``exact_limit`` pixels (default 4M; 16 bytes per pixel), else
  from per-class histograms of ``n_bins`` (default 65,536) equal-width bins over the score
  range: memory O(n_bins) however many pixels, pixels in one bin counted as ties. The error this
  adds is at most half the fraction of (lesion, background) pairs that share a bin;
  :func:`histogram_auroc` returns that bound.
- best Dice: max over thresholds t of 2·TP / (2·TP + FP + FN) with lesion = score >= t, the
  dataset-level Dice of Baur et al. (2021); exact over every distinct score or over bin edges.

Own code, not torchmetrics (tests/test_pixel_eval.py checks both give the same numbers where
torchmetrics applies): torchmetrics (1.x) passes scores outside [0, 1] through a sigmoid, so raw
anomaly scores saturate into ties (AUROC 0.5 on scores near 100), and with thresholds its
curves loop over them once the input exceeds 50k values, O(pixels × bins) against the
histograms' O(pixels); it also returns float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

EXACT_LIMIT = 4_000_000
N_BINS = 65_536


def _np(a) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


class Stitcher:
    """Accumulates patch maps into B-scan maps: sums (float32) and counts (uint16), each
    (n_images, H, W): 6 bytes per pixel, e.g. ~300 MB for 20 test volumes of 49 B-scans.

    ``shapes``: (n_images, 2) rows and columns per B-scan (B-scans of one split may differ in
    width; the accumulators are padded to the widest, padding stays uncovered).

    Not ``torch.nn.functional.fold`` (equal on a stride lattice, tests/test_pixel_eval.py):
    fold places blocks on a lattice of ``stride`` only, and the test grid's last row and column
    of patches sit flush with the band's edge, off it (``preprocess.grid_patch_positions``);
    fold with stride 1 would need (H - S + 1)(W - S + 1) blocks of S² values per B-scan. The
    patches of one B-scan also arrive over several batches, which this accumulates as they come.
    """

    def __init__(self, shapes: np.ndarray) -> None:
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        self.shapes = shapes
        h, w = (int(shapes[:, 0].max()), int(shapes[:, 1].max())) if len(shapes) else (0, 0)
        self.sum = np.zeros((len(shapes), h, w), dtype=np.float32)
        self.count = np.zeros((len(shapes), h, w), dtype=np.uint16)

    def add(self, amaps: Tensor | np.ndarray, coords: Tensor | np.ndarray) -> None:
        """amaps (B, 1, h, w) or (B, h, w); coords (B, 3) = (B-scan index, y, x) of each
        patch's top-left pixel."""
        a = _np(amaps).astype(np.float32)
        if a.ndim == 4:
            a = a[:, 0]
        c = _np(coords).astype(np.int64)
        if len(a) != len(c):
            raise ValueError(f"{len(a)} maps for {len(c)} coordinates")
        ph, pw = a.shape[1:]
        for m, (i, y, x) in zip(a, c, strict=True):
            if y < 0 or x < 0 or y + ph > self.shapes[i, 0] or x + pw > self.shapes[i, 1]:
                raise ValueError(
                    f"patch at ({y}, {x}) of size {ph}x{pw} leaves B-scan {i} "
                    f"of shape {tuple(self.shapes[i])}"
                )
            self.sum[i, y : y + ph, x : x + pw] += m
            self.count[i, y : y + ph, x : x + pw] += 1

    def maps(self) -> np.ndarray:
        """(n_images, H, W) float32 mean map; NaN where no patch lies."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sum / self.count).astype(np.float32)


def stitch(
    amaps: Tensor | np.ndarray, coords: Tensor | np.ndarray, shapes: np.ndarray
) -> np.ndarray:
    """(n_images, H, W) float32 mean of the patch maps over each pixel (NaN: uncovered)."""
    s = Stitcher(shapes)
    s.add(amaps, coords)
    return s.maps()


def aggregate_windows(
    scores: Tensor,
    image_index: Tensor,
    n_images: int,
    rule: str = "max",
    top_k: int = 3,
    all_rules: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Window scores (N,) -> B-scan scores (n_images,) float64 by ``rule``: ``max``, ``mean`` or
    ``topk`` (the mean of the ``top_k`` highest windows, all of them when fewer). B-scans with
    no window are NaN. ``all_rules``: also every rule's scores as ``{"window_<rule>": ...}``
    (``window_top<k>`` for topk), for choosing the rule on validation AUROC."""
    s = scores.detach().double().cpu()
    idx = image_index.detach().long().cpu()
    order = torch.argsort(s, descending=True, stable=True)  # by score, descending
    order = order[torch.argsort(idx[order], stable=True)]  # then by B-scan: each block sorted
    s_sorted, i_sorted = s[order], idx[order]
    counts = torch.bincount(idx, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(s)) - starts[i_sorted]  # 0 = the B-scan's highest window

    def by(name: str) -> Tensor:
        out = torch.full((n_images,), float("nan"), dtype=torch.float64)
        if name == "max":
            sel = rank == 0
            out[i_sorted[sel]] = s_sorted[sel]
            return out
        sel = rank < top_k if name == "topk" else torch.ones_like(rank, dtype=torch.bool)
        total = torch.zeros(n_images, dtype=torch.float64).index_add_(
            0, i_sorted[sel], s_sorted[sel]
        )
        num = torch.bincount(i_sorted[sel], minlength=n_images).double()
        has = num > 0
        out[has] = total[has] / num[has]
        return out

    if rule not in ("max", "mean", "topk"):
        raise ValueError(f"aggregation rule {rule!r}; expected max, mean or topk")
    extra = {}
    if all_rules:
        extra = {
            f"window_{'top' + str(top_k) if r == 'topk' else r}": by(r)
            for r in ("max", "topk", "mean")
        }
    return by(rule), extra


def retina_map_scores(maps: np.ndarray, retina: list[np.ndarray]) -> Tensor:
    """B-scan scores (n,) float64: the mean of each stitched map (n, H, W) over its retina
    pixels (``retina[i]`` (h, w) bool, from ILM to BM; NaN pixels and an empty retina ignored:
    NaN). The ``map_retina`` rule: the map says where tissue does not fit, and a B-scan is as
    anomalous as its retina is on average, so an extended lesion (fluid, a thickened retina)
    counts by its extent, and speckle or shadows outside the retina do not count at all."""
    out = torch.full((len(maps),), float("nan"), dtype=torch.float64)
    for i, (m, r) in enumerate(zip(maps, retina, strict=True)):
        h, w = r.shape
        v = np.asarray(m[:h, :w], dtype=np.float64)[r]
        v = v[np.isfinite(v)]
        if v.size:
            out[i] = float(v.mean())
    return out


def pad_stack(arrays: list[np.ndarray | None], shape: tuple[int, int, int]) -> np.ndarray:
    """(n, H, W) uint8 from per-B-scan masks of possibly smaller (h, w) (None = no lesion),
    zero-padded like :class:`Stitcher`'s maps."""
    out = np.zeros(shape, dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a is not None:
            out[i, : a.shape[0], : a.shape[1]] = np.asarray(a) != 0
    return out


def _pixels(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Flattened covered pixels: (scores float64, targets bool); NaN scores dropped."""
    s = _np(scores).astype(np.float64).ravel()
    t = _np(targets).ravel() != 0
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

    maps, masks = _np(maps).astype(np.float64), _np(masks) != 0
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
    maps, masks = _np(maps), _np(masks)
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


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    vmax: float | None = None,
    title: str = "",
) -> Path:
    """PNG of one B-scan: left the image with the lesion mask outlined (cyan), right the same
    with the anomaly map as a translucent heat map (inferno, 0..``vmax``; uncovered pixels
    clear). image (H, W) in [-1, 1]; amap (H, W), NaN where not scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image, amap = _np(image), _np(amap).astype(np.float32)
    h, w = image.shape
    if amap.shape != (h, w):
        raise ValueError(f"anomaly map {amap.shape} does not match the image {image.shape}")
    vmax = vmax if vmax is not None else float(np.nanmax(amap)) if np.isfinite(amap).any() else 1.0
    fig = Figure(figsize=(2 * max(w / 100, 2.5), max(h / 100, 1.2) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, overlay in zip(axes, (False, True), strict=True):
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        if overlay:
            ax.imshow(
                np.ma.masked_invalid(amap),
                cmap="inferno",
                vmin=0,
                vmax=vmax,
                alpha=0.55,
                interpolation="nearest",
            )
        if mask is not None and np.any(mask):
            ax.contour(_np(mask).astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("B-scan, lesion mask" if mask is not None else "B-scan", fontsize=7)
    axes[1].set_title(f"anomaly map (0..{vmax:.3g})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def write_overlays(
    out_dir: str | Path,
    maps: np.ndarray,
    masks: np.ndarray,
    image: Callable[[int], np.ndarray],
    ids: list[str],
    n: int = 8,
) -> list[Path]:
    """Up to ``n`` overlay PNGs ``bscan_<k>_<id>.png``: the B-scans with the largest lesion area
    first (half of them), then healthy ones, on one colour scale (the 99th percentile of all
    covered scores).

    Args:
        maps, masks: (n_images, H, W) stitched maps and zero-padded masks (:func:`pad_stack`).
        image: B-scan index -> its image (h, w) in [-1, 1]; called only for the B-scans drawn.
        ids: one name per B-scan, e.g. ``"<volume file>:b<B-scan>"``.
    """
    maps, masks = _np(maps), _np(masks)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    sick = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0][: (n + 1) // 2]
    well = [i for i in range(len(masks)) if area[i] == 0][: n - len(sick)]
    if not sick and len(maps):  # no masks (whole-scan windows): highest and lowest map peaks
        peak = np.nan_to_num(np.nanmax(maps.reshape(len(maps), -1), axis=1), nan=-np.inf)
        order = [int(i) for i in np.argsort(-peak, kind="stable")]
        well = list(dict.fromkeys(order[: (n + 1) // 2] + order[::-1][: n // 2]))
    covered = maps[~np.isnan(maps)]
    vmax = float(np.percentile(covered, 99)) if covered.size else 1.0
    paths = []
    for k, i in enumerate(sick + well):
        img = image(i)
        h, w = img.shape
        name = Path(ids[i]).name  # a B-scan file's own suffix dropped: scan.png -> scan
        name = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        out = Path(out_dir) / f"bscan_{k:02d}_{name}.png"
        paths.append(save_overlay(out, img, maps[i, :h, :w], masks[i, :h, :w], vmax, ids[i]))
    return paths
