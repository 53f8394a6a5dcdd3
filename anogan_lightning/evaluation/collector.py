"""The evaluation of one val/test split: what a method's val/test steps score, gathered into the
split's metrics and its per-image record (in the spirit of anomalib's ``Evaluator``).

:class:`Collector` is driven by :class:`~anogan_lightning.methods.base.AnomalyModule`'s hooks:
``start(split, dataset)`` at the start of the epoch, ``collect(batch, out)`` after each step with
the method's ``score()`` output, ``finish(val_threshold)`` at the end. It keeps the scores and a
few sample images, merges the ranks' buffers under DDP, stitches patch/window maps into their
images, turns window scores into B-scan scores (:func:`~.stitch.window_to_bscan`), restricts the
maps to the dataset's map region, adds the reference scores (``thickness``), computes the image
metrics (:func:`~.metrics.evaluate`) and the pixel metrics, and says whether the split could be
scored:

- ``ok``: every image of the split is in the metrics;
- ``partial``: some images are not (a batch limit such as ``limit_test_batches`` cut the split
  short, or unreadable images were skipped); windowed B-scans whose windows were not all scored
  are left out, and the metrics are those of the complete ones; ``<split>/dropped`` counts the
  images left out and ``<split>/reason`` says why;
- ``not_scored``: no image-level AUROC (one class only, no image scored, or
  ``aggregate=map_retina`` without a map); ``<split>/reason`` says why.

What it reads from a dataset beyond its items is declared in :mod:`.protocol`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from anogan_lightning.evaluation import metrics as image_metrics
from anogan_lightning.evaluation import pixel, protocol, stitch

N_SAMPLES = 8  # images per class kept for samples.png
N_EXTREMES = 4  # highest- and lowest-scoring test images kept for anomaly_maps/
OK, PARTIAL, NOT_SCORED = "ok", "partial", "not_scored"


@dataclass
class SplitEvaluation:
    """The outcome of :meth:`Collector.finish`.

    ``metrics``: flat ``{"<split>/auroc": ..., "<split>/status": "ok", ...}`` (numbers, and
    the strings ``status`` and ``reason``). ``record``: per image ``ids``, ``labels`` (N,),
    ``classes`` (names or None), ``score`` (N,), ``components`` (name -> (N,)), ``references``
    (name -> (N,): scores that are no part of the method, e.g. ``thickness``), ``columns`` (the
    order of the component and reference columns of scores.csv), ``samples``, ``highest``,
    ``lowest`` (images for the figures) and ``pixel`` (stitched maps and masks, or None).
    ``threshold``: the Youden cut-off of a val split with both classes (else None).
    """

    metrics: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    threshold: float | None = None


def eval_dataset(trainer, split: str):
    """The dataset behind the val (``split="val"``) or test loader of ``trainer`` (None outside
    a Trainer or without one)."""
    if trainer is None:
        return None
    loaders = getattr(trainer, f"{'val' if split == 'val' else 'test'}_dataloaders", None)
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def _sample(batch: dict, out: dict[str, Tensor], i: int) -> dict:
    """One image's tensors (CPU, float32) for the figures."""
    label = int(batch["label"][i])
    sample = {
        "x": batch["x"][i].detach().float().cpu(),
        "label": label,
        "id": str(batch["id"][i]),
        "score": float(out["score"][i]),
        "title": ("normal", "anomalous")[label],
    }
    for key in ("x_hat", "amap"):
        if key in out:
            sample[key] = out[key][i].detach().float().cpu()
    if "mask" in batch:
        sample["mask"] = batch["mask"][i].detach().float().cpu()
    return sample


class Collector:
    """Gathers one split's scores batch by batch and evaluates them (module docstring).

    Args:
        components: the names of the method's image-level score components beside ``score``
            (each a (B,) entry of its ``score()`` output), in display order.
    """

    def __init__(self, components: tuple[str, ...] = ()) -> None:
        self.components = tuple(components)
        self._buf: dict | None = None

    def start(self, split: str, dataset=None) -> None:
        """Empty buffers for ``split``; ``dataset``: the split's dataset (None: items only, no
        stitching, aggregation or completeness check)."""
        windows = protocol.windowed(dataset)
        self._buf = {
            "split": split,
            "dataset": dataset,
            "stitcher": stitch.Stitcher(dataset.image_shapes)
            if protocol.stitched(dataset)
            else None,
            "windows": windows,
            "image_index": [],  # windows: B-scan index of each window (coords[:, 0])
            "pixel_maps": [],  # whole images with masks: (B, H, W) maps and masks
            "pixel_masks": [],
            "ids": [],
            "labels": [],
            "classes": [],  # class names per image where the batches carry them ("cls")
            "score": [],
            "components": defaultdict(list),
            "samples": {0: [], 1: []},
            "highest": [],
            "lowest": [],
        }

    def collect(self, batch: dict, out: dict[str, Tensor]) -> None:
        """Keep one batch's scores (``out``: the method's ``score()`` of ``batch``)."""
        buf = self._buf
        labels = batch["label"].detach().cpu()
        score = out["score"].detach().float().cpu()
        buf["ids"].extend(batch["id"])
        if "cls" in batch:
            buf["classes"].extend(str(c) for c in batch["cls"])
        buf["labels"].append(labels)
        buf["score"].append(score)
        for name in self.components:
            buf["components"][name].append(out[name].detach().float().cpu())
        for cls in (0, 1):  # the first few images per class for samples.png
            need = N_SAMPLES - len(buf["samples"][cls])
            for i in torch.nonzero(labels == cls).flatten()[:need].tolist():
                buf["samples"][cls].append(_sample(batch, out, i))
        if buf["windows"]:
            buf["image_index"].append(batch["coords"][:, 0].detach().cpu())
        if "amap" in out and ("mask" in batch or buf["stitcher"] is not None):
            amap = out["amap"].detach().float().cpu()
            if buf["stitcher"] is not None and "coords" in batch:
                buf["stitcher"].add(amap, batch["coords"].cpu())
            elif "mask" in batch:  # whole images with masks: pixel-level evaluation
                buf["pixel_maps"].append(amap[:, 0].half())
                buf["pixel_masks"].append(batch["mask"][:, 0].detach().cpu() > 0.5)
        # running top-k / bottom-k by score, for the anomaly-map figures
        k = min(N_EXTREMES, len(score))
        for key, descending in (("highest", True), ("lowest", False)):
            idx = torch.sort(score, descending=descending, stable=True).indices[:k]
            merged = buf[key] + [_sample(batch, out, i) for i in idx.tolist()]
            merged.sort(key=lambda s: s["score"], reverse=descending)
            buf[key] = merged[:N_EXTREMES]

    def finish(self, val_threshold: float | None = None) -> SplitEvaluation:
        """The split's metrics and record (every rank's buffers merged under DDP).

        ``val_threshold`` (raw score units; a test split) adds the metrics at that cut-off.
        """
        buf = _gather(self._buf)
        self._buf = None
        split, ds = buf["split"], buf["dataset"]
        labels = torch.cat(buf["labels"]) if buf["labels"] else torch.zeros(0, dtype=torch.long)
        scores = torch.cat(buf["score"]) if buf["score"] else torch.zeros(0)
        components = {k: torch.cat(v) for k, v in buf["components"].items()}
        references: dict[str, Tensor] = {}
        ids = buf["ids"]
        classes = buf["classes"] if len(buf["classes"]) == len(labels) and len(labels) else None
        maps = _stitched(buf)
        columns = None
        keep = None  # windows: the complete B-scans (bool, n_images)
        status, reason, dropped = OK, "", 0
        if not len(labels):
            status, reason = NOT_SCORED, "no image was scored (an empty split, or no batch ran)"
        elif buf["windows"]:  # window scores -> one score per B-scan, labelled per B-scan
            index = torch.cat(buf["image_index"])
            n = len(ds.image_ids)
            got = torch.bincount(index, minlength=n)
            keep = (got == torch.as_tensor(ds.window_counts, dtype=torch.long)) & (got > 0)
            bscans = stitch.window_to_bscan(
                scores,
                components,
                index,
                n,
                ds.aggregate,
                ds.top_k,
                maps,
                ds.image_retina,
                all_rules=True,
            )
            references["thickness"] = ds.thickness_scores()  # the anatomy reference
            columns = [*bscans.components, *references, *bscans.map_scores]
            scores = bscans.score[keep]
            components = {k: v[keep] for k, v in {**bscans.components, **bscans.map_scores}.items()}
            references = {k: v[keep] for k, v in references.items()}
            labels = torch.as_tensor(ds.image_labels)[keep]
            ids = [id_ for id_, k in zip(ds.image_ids, keep.tolist(), strict=True) if k]
            if classes is not None:  # each window carries its B-scan's class
                per_image: list[str | None] = [None] * n
                for i, c in zip(index.tolist(), classes, strict=True):
                    per_image[i] = c
                classes = [c for c, k in zip(per_image, keep.tolist(), strict=True) if k]
            dropped = int((~keep).sum())
            if bscans.error is not None:  # no B-scan score at all: no rows either
                status, reason, keep = NOT_SCORED, bscans.error, torch.zeros_like(keep)
                scores, labels, ids, classes = scores[:0], labels[:0], [], None
                components = {k: v[:0] for k, v in components.items()}
                references = {k: v[:0] for k, v in references.items()}
            elif not keep.any():
                status = NOT_SCORED
                reason = f"none of the {n} B-scans had all its windows scored (a batch limit?)"
            elif dropped:
                status = PARTIAL
                reason = (
                    f"{dropped} of {n} B-scans left out: not all their windows were scored "
                    "(a batch limit such as limit_test_batches?)"
                )
        elif hasattr(ds, "__len__") and len(labels) < len(ds):
            dropped = len(ds) - len(labels)
            status = PARTIAL
            reason = (
                f"{len(labels)} of {len(ds)} images scored (unreadable images skipped, or a "
                "batch limit such as limit_test_batches)"
            )
        if status != NOT_SCORED and not image_metrics.has_both_classes(labels):
            only = "normal" if bool((labels == 0).all()) else "anomalous"
            left_out = f" ({reason})" if status == PARTIAL else ""
            status = NOT_SCORED
            reason = f"only {only} images ({len(labels)}): the AUROC needs both classes{left_out}"

        out: dict = {}
        if status != NOT_SCORED:
            scored = {**components, **references}
            if columns is not None:  # the order of scores.csv
                scored = {k: scored[k] for k in columns}
            out = image_metrics.evaluate(scores, labels, split, scored, val_threshold, classes)
        pixel_rec = _pixel_record(buf, maps, keep)
        if pixel_rec is not None and pixel_rec["masks"].any():
            out.update(pixel.pixel_metrics(pixel_rec["maps"], pixel_rec["masks"], split))
            if "index" in pixel_rec and hasattr(buf["dataset"], "scan_map"):
                out.update(_scan_pixel_metrics(buf["dataset"], pixel_rec, split))
        out[f"{split}/status"] = status
        if status != OK:
            out[f"{split}/reason"] = reason
        if dropped and status == PARTIAL:
            out[f"{split}/dropped"] = dropped
        threshold = None
        if split == "val" and status != NOT_SCORED:
            threshold = out[f"{split}/youden_threshold"]
        record = {
            "ids": ids,
            "labels": labels,
            "classes": classes,
            "score": scores,
            "components": components,
            "references": references,
            "columns": columns,
            "samples": buf["samples"][0] + buf["samples"][1],
            "highest": buf["highest"],
            "lowest": buf["lowest"],
            "pixel": pixel_rec if pixel_rec is not None and "image" in pixel_rec else None,
        }
        return SplitEvaluation(out, record, threshold)


def _stitched(buf: dict) -> np.ndarray | None:
    """The split's stitched maps (N, H, W), restricted to the dataset's map region (windowed
    B-scans: 0 outside ILM..BM by default), or None without a stitcher."""
    if buf["stitcher"] is None:
        return None
    maps = buf["stitcher"].maps()
    return buf["dataset"].restrict_maps(maps) if buf["windows"] else maps


def _pixel_record(buf: dict, maps: np.ndarray | None, keep: Tensor | None) -> dict | None:
    """Pixel maps and masks of a split, (N, H, W) numpy, when the data has masks; ``maps``: the
    stitched ones (:func:`_stitched`) where the split has a stitcher, of the images ``keep``
    (None: all)."""
    ds = buf["dataset"]
    if maps is not None:
        masks = [ds.image_mask(i) for i in range(len(ds.image_ids))]
        record = {
            "maps": maps,
            "masks": stitch.pad_stack(masks, maps.shape),
            "image": ds.image,
            "ids": ds.image_ids,
            "index": list(range(len(ds.image_ids))),
        }
        if keep is not None and not bool(keep.all()):  # complete B-scans only
            kept = torch.nonzero(keep).flatten().tolist()
            record = {
                "maps": maps[kept],
                "masks": record["masks"][kept],
                "image": lambda i: ds.image(kept[i]),
                "ids": [ds.image_ids[i] for i in kept],
                "index": kept,
            }
        return record
    if buf["pixel_maps"]:
        return {
            "maps": torch.cat(buf["pixel_maps"]).float().numpy(),
            "masks": torch.cat(buf["pixel_masks"]).numpy().astype("uint8"),
        }
    return None


def _scan_pixel_metrics(ds, rec: dict, split: str) -> dict[str, float]:
    """``{split}/pixel_auroc_scan`` and ``{split}/pixel_count_scan``: the pixel AUROC of the
    stitched maps carried back onto each B-scan's own pixel grid
    (:meth:`~anogan_lightning.data.retina.normalize.NormalizedBScan.to_scan`) against its mask
    read at the scan's resolution, over the scan pixels the band covers. The band figure
    (``pixel_auroc``) counts band pixels, each of which stands for several scan pixels and
    whose mask is the resampled one; this one counts the clinician's pixels and masks."""
    scores, targets = [], []
    for j, i in enumerate(rec["index"]):
        mask = ds.scan_mask(i)
        if mask is None:
            continue
        m = ds.scan_map(i, rec["maps"][j])
        scores.append(m.ravel())
        targets.append(mask.ravel())
    if not scores:
        return {}
    s, t = np.concatenate(scores), np.concatenate(targets)
    return {
        f"{split}/pixel_auroc_scan": pixel.pixel_auroc(s, t),
        f"{split}/pixel_count_scan": float(np.isfinite(s).sum()),
    }


def _gather(buf: dict) -> dict:
    """Merge every rank's buffers (DDP): metrics are computed over the whole split.

    A DistributedSampler pads the last ranks with repeated images; repeats are dropped by id.
    Stitched pixel maps are summed across ranks (a repeated patch adds the same map twice to its
    own pixels, which leaves their mean unchanged).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return buf
    mine = {
        "ids": buf["ids"],
        "classes": buf["classes"],
        "labels": torch.cat(buf["labels"]) if buf["labels"] else torch.zeros(0, dtype=torch.long),
        "score": torch.cat(buf["score"]) if buf["score"] else torch.zeros(0),
        "components": {k: torch.cat(v) for k, v in buf["components"].items()},
        "samples": buf["samples"],
        "highest": buf["highest"],
        "lowest": buf["lowest"],
        "pixel_maps": buf["pixel_maps"],
        "pixel_masks": buf["pixel_masks"],
        "image_index": torch.cat(buf["image_index"]) if buf["image_index"] else None,
    }
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    seen: set[str] = set()
    keep = []  # (rank, index) of first occurrences
    for r, part in enumerate(parts):
        for i, id_ in enumerate(part["ids"]):
            if id_ not in seen:
                seen.add(id_)
                keep.append((r, i))
    out = dict(buf)
    out["ids"] = [parts[r]["ids"][i] for r, i in keep]
    if all(len(p["classes"]) == len(p["ids"]) for p in parts):
        out["classes"] = [parts[r]["classes"][i] for r, i in keep]
    else:
        out["classes"] = []
    out["labels"] = [torch.stack([parts[r]["labels"][i] for r, i in keep])] if keep else []
    out["score"] = [torch.stack([parts[r]["score"][i] for r, i in keep])] if keep else []
    names = parts[0]["components"].keys()
    out["components"] = {
        n: [torch.stack([parts[r]["components"][n][i] for r, i in keep])] for n in names if keep
    }
    out["samples"] = {c: [s for p in parts for s in p["samples"][c]][:N_SAMPLES] for c in (0, 1)}
    for key, desc in (("highest", True), ("lowest", False)):
        merged = {s["id"]: s for p in parts for s in p[key]}.values()
        out[key] = sorted(merged, key=lambda s: s["score"], reverse=desc)[:N_EXTREMES]
    if buf["windows"] and keep:
        out["image_index"] = [torch.stack([parts[r]["image_index"][i] for r, i in keep])]
    out["pixel_maps"] = [m for p in parts for m in p["pixel_maps"]]
    out["pixel_masks"] = [m for p in parts for m in p["pixel_masks"]]
    if buf["stitcher"] is not None:
        for name in ("sum", "count"):
            arr = getattr(buf["stitcher"], name)
            t = torch.from_numpy(arr.astype("float64"))
            dist.all_reduce(t)
            setattr(buf["stitcher"], name, t.numpy().astype(arr.dtype))
    return out
