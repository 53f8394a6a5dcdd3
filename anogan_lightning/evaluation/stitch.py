"""Patch and window maps back into their B-scans, and window scores into B-scan scores.

Patch anomaly maps (B, 1, h, w) are placed back into their B-scans by the patch coordinates
(B-scan index, y, x) that every patch or window carries (``coords``: the volume patches of
:class:`anogan_lightning.data.patch_dataset.PatchDataset`, the whole-scan windows of the retina
B-scan datasets); overlapping patches are averaged, pixels no patch covers are NaN.

:func:`window_to_bscan` is the one place where window scores become B-scan scores: the
evaluation of a split (:mod:`anogan_lightning.evaluation.collector`) and ``predict`` on one
B-scan both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from anogan_lightning.evaluation.pixel import as_numpy


class Stitcher:
    """Accumulates patch maps into B-scan maps: sums (float32) and counts (uint16), each
    (n_images, H, W): 6 bytes per pixel, e.g. ~300 MB for 20 test volumes of 49 B-scans.

    ``shapes``: (n_images, 2) rows and columns per B-scan (B-scans of one split may differ in
    width; the accumulators are padded to the widest, padding stays uncovered).

    Not ``torch.nn.functional.fold`` (equal on a stride lattice,
    tests/test_evaluation_pixel.py): fold places blocks on a lattice of ``stride`` only, and the
    test grid's last row and column of patches sit flush with the band's edge, off it (the grid
    positions of the volume patches and of the B-scan windows); fold with stride 1 would need (H - S + 1)(W - S + 1) blocks of S² values per B-scan. The
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
        a = as_numpy(amaps).astype(np.float32)
        if a.ndim == 4:
            a = a[:, 0]
        c = as_numpy(coords).astype(np.int64)
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


@dataclass
class BScanScores:
    """Window scores turned into one score per B-scan (:func:`window_to_bscan`); every tensor
    (n_images,) float64, NaN for a B-scan without a window."""

    score: Tensor
    #: the window-level components, each aggregated by the window rule, then (``all_rules``)
    #: every rule's aggregate of the window scores, ``window_<rule>``
    components: dict[str, Tensor] = field(default_factory=dict)
    #: ``map_retina``: the mean stitched map over the retina (:func:`retina_map_scores`), where
    #: the method gave a map
    map_scores: dict[str, Tensor] = field(default_factory=dict)
    #: why ``rule`` could not score the B-scans (``map_retina`` without a map), else None
    error: str | None = None


def window_to_bscan(
    score: Tensor,
    components: Mapping[str, Tensor],
    image_index: Tensor,
    n_images: int,
    rule: str,
    top_k: int = 3,
    maps: np.ndarray | None = None,
    retina: Callable[[int], np.ndarray] | None = None,
    all_rules: bool = False,
) -> BScanScores:
    """B-scan scores from window scores by the dataset's ``aggregate`` rule.

    Args:
        score, components: (N,) scores of N windows (components: the method's others).
        image_index: (N,) B-scan index of each window (``coords[:, 0]``).
        rule: ``max``, ``mean``, ``topk`` (:func:`aggregate_windows`) or ``map_retina``: the
            mean of the B-scan's stitched map over its retina; the window scores (the
            components, the window rules' scores) are then aggregated by max.
        maps: (n_images, H, W) stitched maps (:class:`Stitcher`, restricted to the dataset's
            map region), or None when the method gives no map.
        retina: B-scan index -> its retina pixels (h, w) bool; with ``maps``, adds
            ``map_scores["map_retina"]``.
        all_rules: also every window rule's B-scan score as ``components["window_<rule>"]``.
    """
    window_rule = "max" if rule == "map_retina" else rule
    s, alternatives = aggregate_windows(
        score, image_index, n_images, window_rule, top_k, all_rules=all_rules
    )
    comps = {
        k: aggregate_windows(v, image_index, n_images, window_rule, top_k)[0]
        for k, v in components.items()
    }
    comps.update(alternatives)
    map_scores = {}
    if maps is not None and retina is not None:
        by_map = retina_map_scores(maps, [retina(i) for i in range(n_images)])
        if torch.isfinite(by_map).any():  # else the method gave no map
            map_scores["map_retina"] = by_map
    error = None
    if rule == "map_retina":
        if "map_retina" in map_scores:
            s = map_scores["map_retina"]
        else:
            error = (
                "aggregate=map_retina needs an anomaly map and the method gave none for these "
                "windows (choose max, mean or topk)"
            )
    return BScanScores(s, comps, map_scores, error)
