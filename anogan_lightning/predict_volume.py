"""OCT volumes in :mod:`anogan_lightning.predict`: a checkpoint trained on ``data=oct_volume``.

Preprocessing is the training run's test path itself, not a copy of it. The checkpoint stores
the data config; :func:`volume_datamodule` builds the :class:`OCTVolumeDataModule` from it (no
data is read) for its ``PrepSettings``, ``image_size`` and ``grid_stride``. Each volume goes
through :func:`~anogan_lightning.data.volume_cache.cached_volume` (read, normalise, resample x,
ILM/BM, flatten, crop) and :func:`~anogan_lightning.data.patch_cache.build_patch_cache` (grid
patches) into a scratch folder, is read back as a
:class:`~anogan_lightning.data.patch_dataset.PatchDataset` (patch ids, coordinates and B-scan
shapes as in a test split), scored in batches, and its scratch folders are deleted: one volume
at a time in memory and on disk (plus ``num_workers`` volumes prepared ahead, on disk).

Scores. The checkpoint's threshold is the Youden cut-off of the validation *patch* scores (a
patch is positive when a lesion pixel lies in it), so it is applied to patches: a B-scan's
score is the max of its patch scores, a volume's the max over all its patches, and each is
anomalous when that max >= threshold, i.e. when at least one of its patches is. Why the max
and not a mean or a percentile: lesions are focal (a cyst fills a few of the hundreds of
patches of a volume), a mean or a 90th percentile would drown them, and a percentile would need
a threshold of its own, which the checkpoint does not hold. The price: the threshold fixes the
false-positive rate per patch, not per volume, so the more patches, the likelier a false alarm
on a healthy scan; the rows therefore also count ``patches`` and ``anomalous_patches`` for a
stricter rule of one's own (e.g. at least k anomalous patches). Score components in a B-scan or
volume row are those of its max-scoring patch. B-scans without a grid patch (no retina found)
have no score and no decision.

Maps: patch maps (``amap``) stitched into flattened B-scans by
:class:`anogan_lightning.evaluation.stitch.Stitcher` (overlaps averaged, uncovered pixels NaN);
the ``max_bscan_heatmaps`` highest-scoring B-scans of a volume are drawn by
:func:`anogan_lightning.evaluation.figures.write_volume_heatmaps`, on one colour scale per volume
(the 99th percentile of its map).
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import numpy as np
import torch
from torch.utils.data import Dataset

from anogan_lightning.data.oct_volume import OCTVolumeDataModule
from anogan_lightning.data.patch_cache import build_patch_cache
from anogan_lightning.data.patch_dataset import PatchDataset
from anogan_lightning.data.volume_cache import cached_volume
from anogan_lightning.data.volume_sources import VolumeSource
from anogan_lightning.evaluation.stitch import Stitcher
from anogan_lightning.extras import MissingExtraError

RULE = "max patch score >= threshold"  # a B-scan / volume: any of its patches anomalous


def volume_datamodule(data: dict, spacing_x_um: float | None = None) -> OCTVolumeDataModule | None:
    """The training run's OCTVolumeDataModule (settings only), or None for a 2-D data config.

    ``spacing_x_um`` replaces the run's fallback column spacing for files that carry none.
    """
    target = data.get("_target_")
    try:
        cls = hydra.utils.get_class(target) if target else None
    except (ImportError, ValueError):  # a 2-D data module that no longer exists
        return None
    if not (isinstance(cls, type) and issubclass(cls, OCTVolumeDataModule)):
        return None
    dm = hydra.utils.instantiate(data)
    if spacing_x_um is not None:
        dm.settings = replace(dm.settings, spacing_x_um=float(spacing_x_um))
    return dm


class VolumeFiles(Dataset):
    """Volume files prepared into ``scratch`` like the training run's test volumes.

    Item: ``{"path", "dirs": [volume folder, patch folder]}`` or ``{"path", "error"}`` for a
    file that cannot be read or prepared (bad file, wrong shape, no spacing, patches that do not
    fit, segmentation failure).
    """

    def __init__(self, paths: list[Path], dm: OCTVolumeDataModule, scratch: Path) -> None:
        self.paths, self.dm, self.scratch = paths, dm, scratch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path, dm = self.paths[i], self.dm
        dirs: list[Path] = []
        try:
            vdir, _ = cached_volume(VolumeSource(path), dm.settings, self.scratch)
            dirs.append(vdir)
            pdir, _ = build_patch_cache(
                [vdir], self.scratch, dm.image_size, "grid", stride=dm.grid_stride
            )
            dirs.append(pdir)
            if len(PatchDataset(pdir)) == 0:
                raise ValueError("no grid patch touches the detected retina")
        except MissingExtraError:  # the format's reader is not installed: stop, naming the extra
            remove(dirs)
            raise
        except Exception as e:  # any reader/segmentation error: a row in the CSV, never fatal
            remove(dirs)
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            if "no voxel spacing" in msg:
                msg += "; for predict: spacing_x_um=<µm per column>"
            return {"path": path, "error": f"{type(e).__name__}: {msg}"}
        return {"path": path, "dirs": dirs}


def as_is(item: dict) -> dict:
    """DataLoader collate for :class:`VolumeFiles` (one volume per item, nothing to stack)."""
    return item


def remove(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class VolumeScores:
    """Patch scores of one volume and its stitched maps."""

    patches: PatchDataset  # the prepared volume: B-scan images (``image(b)``), shapes
    bscan: np.ndarray  # (N,) B-scan index of each patch
    score: np.ndarray  # (N,) raw patch scores
    components: dict[str, np.ndarray]  # name -> (N,)
    maps: np.ndarray | None  # (n_bscans, H, W) float32, NaN where no patch lies

    @property
    def n_bscans(self) -> int:
        return len(self.patches.images)


def score_volume(
    model, patches: PatchDataset, batch_size: int, device: torch.device, maps: bool
) -> VolumeScores:
    """Score every grid patch in batches; stitch the patch maps when ``maps``."""
    stitcher = Stitcher(patches.image_shapes) if maps else None
    scores, comps, stitched = [], defaultdict(list), False
    for start in range(0, len(patches), batch_size):
        batch = patches[np.arange(start, min(start + batch_size, len(patches)))]
        x = batch["x"].to(device)  # (B, 1, S, S) in [-1, 1]
        with torch.inference_mode(not model.needs_grad_at_test):
            res = model.score({"x": x, "id": batch["id"], "coords": batch["coords"]})
        scores.append(res["score"].detach().float().cpu())
        for name in model.components:
            comps[name].append(res[name].detach().float().cpu())
        if stitcher is not None and "amap" in res:
            stitcher.add(res["amap"].detach().float().cpu(), batch["coords"])
            stitched = True
    return VolumeScores(
        patches,
        patches.coords[:, 0].astype(np.int64),
        torch.cat(scores).numpy(),
        {k: torch.cat(v).numpy() for k, v in comps.items()},
        stitcher.maps() if stitched else None,
    )


def summarize(vs: VolumeScores, idx: np.ndarray, threshold: float) -> dict:
    """Score (max over the patches ``idx``), the max patch's components, patch counts and the
    decision (None without a threshold or without patches)."""
    out: dict = {"patches": len(idx), "score": math.nan, "anomalous": None}
    out.update({name: math.nan for name in vs.components})
    out["anomalous_patches"] = None if math.isnan(threshold) else 0
    if len(idx) == 0:
        return out
    s = vs.score[idx]
    top = idx[int(np.argmax(s))]
    out["score"] = float(vs.score[top])
    out.update({name: float(c[top]) for name, c in vs.components.items()})
    if not math.isnan(threshold):
        out["anomalous_patches"] = int((s >= threshold).sum())
        out["anomalous"] = int(out["score"] >= threshold)
    return out


def bscan_rows(vs: VolumeScores, threshold: float) -> list[dict]:
    """One summary per B-scan (:func:`summarize`), with its index ``bscan``."""
    order = np.argsort(vs.bscan, kind="stable")
    bounds = np.searchsorted(vs.bscan[order], np.arange(vs.n_bscans + 1))
    return [
        {"bscan": b, **summarize(vs, order[bounds[b] : bounds[b + 1]], threshold)}
        for b in range(vs.n_bscans)
    ]


def volume_row(vs: VolumeScores, rows: list[dict], threshold: float) -> dict:
    """The volume's summary over all its patches, with B-scan counts."""
    out = summarize(vs, np.arange(len(vs.score)), threshold)
    out["bscans"] = vs.n_bscans
    out["anomalous_bscans"] = (
        None if math.isnan(threshold) else sum(r["anomalous"] == 1 for r in rows)
    )
    return out
