"""Score new scans with a trained model:
``python -m anogan_lightning.predict ckpt=<model.ckpt | model.onnx | model.pt> input=<file | folder>``.

The checkpoint (``checkpoints/model.ckpt`` of a training run) carries the method's class and
hyperparameters, its weights, the decision threshold chosen on the validation split and the
data settings it was trained with, so new scans are preprocessed exactly as its test data were:
the 2-D path rebuilds the run's
:class:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing` and builds its datasets
through it, as the data module built the test set.
An exported scorer (``python -m anogan_lightning.export``: ``.onnx`` or TorchScript ``.pt``)
is used the same way, with the threshold and data settings of its sidecar ``<file>.json``; its
graph returns the score and the anomaly map only, so its CSV has no component columns.

- A checkpoint trained on 2-D B-scans scores images (.jpeg .jpg .png .tif .tiff .bmp): grayscale,
  resized to the training height, centre square crop, optional flattening (``crop_flatten``);
  a folder is streamed
  in batches (``batch_size``, ``num_workers``) with a progress bar. A ``resize=retina``
  checkpoint normalises each B-scan on its retina with the checkpoint's ``retina`` settings,
  scores every window (``window_stride``), aggregates the window scores by its ``aggregate``
  rule (the B-scan score, compared with the validation threshold, chosen on such scores; the
  window count in ``patches``) and draws the stitched map over the band (0 outside the retina
  with ``map_region=retina``) as the heatmap; a scan
  that fails the retina checks is ``unreadable`` with the reason.
- A checkpoint trained on ``data=oct_volume`` scores OCT volumes (.vol .e2e .npy .npz .tif .tiff
  .nii .nii.gz), one at a time: every B-scan prepared as the training run's test volumes, grid
  patches scored in batches, patch maps stitched into B-scans. A B-scan's / volume's score is
  the max of its patch scores, anomalous when >= the (patch-level) threshold, i.e. when any of
  its patches is: :mod:`anogan_lightning.predict_volume` says why. Volume files without a
  column spacing (.npy, .e2e) take ``spacing_x_um``, else the training run's
  ``data.spacing_x_um``.

A folder is searched recursively for both kinds, following links (files under a ``masks/`` folder, the
annotations of the data layout, are left out). A file the checkpoint cannot score (a volume
for a 2-D checkpoint, an image for a volume checkpoint) gets a ``status=unsupported`` row with
the reason; an unreadable or malformed one (bad file, wrong dimensionality, no spacing,
segmentation failure) a warning and a ``status=unreadable`` row. Neither is fatal.

Writes into the run directory (``outputs/predict/<date>_<time>/``):
- ``predictions.csv``: one row per file: ``path``, ``status`` (ok, unreadable, unsupported),
  ``kind`` (image, volume), ``score``, every score component, ``anomalous`` (1 when
  ``rule`` holds), ``threshold``, ``rule``; volumes also ``bscans``, ``anomalous_bscans``,
  ``patches`` and ``anomalous_patches``; ``error`` (the reason for a skipped file);
- ``MODEL_CARD.md`` with ``model_card=true``: the model's card (:mod:`anogan_lightning.model_card`);
- ``bscans.csv`` (volume checkpoints): one row per (volume, B-scan): ``path``, ``bscan``,
  ``score``, components, ``anomalous``, ``threshold``, ``patches``, ``anomalous_patches``,
  ``heatmap``;
- ``heatmaps/<k>_<name>.png`` per image: the scan and its anomaly map; per volume
  ``heatmaps/<k>_<name>/bscan_<i>.png`` for its ``max_bscan_heatmaps`` highest-scoring B-scans:
  the flattened B-scan and its stitched map (``heatmaps=false`` skips them all).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anogan_lightning import model_card, provenance
from anogan_lightning import predict_bscans as pb
from anogan_lightning import predict_volume as pv
from anogan_lightning.data.bscan.io import IMAGE_SUFFIXES, walk_files
from anogan_lightning.data.bscan.preprocessing import (
    BScanPreprocessing,
    preprocessing_from_checkpoint,
)
from anogan_lightning.data.patch_dataset import PatchDataset
from anogan_lightning.data.readers import (
    VOLUME_SUFFIXES,
    VolumeReadError,
    read_volume,
    stem,
    suffix,
)
from anogan_lightning.evaluation import figures
from anogan_lightning.exported import EXPORT_SUFFIXES, load_exported
from anogan_lightning.extras import MissingExtraError

log = logging.getLogger("anogan_lightning.predict")
SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + VOLUME_SUFFIXES))
IMAGE_RULE = "score >= threshold"
# retina checkpoints: where the file's ILM/BM came from (volumes), scan columns whose retina was
# not found reliably, and the map on the scan (.npy; a volume's en-face map)
MAP_COLUMNS = ("boundaries", "unreliable_columns", "map")


def list_inputs(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """One file, or every image and volume file under a folder (recursively, sorted; links to
    folders and files followed), leaving out annotation masks (files under a ``masks/``
    folder); for a list of files and folders, each in turn (in the given order, repeats
    dropped)."""
    if not isinstance(path, (str, Path)):
        return list(dict.fromkeys(f for p in path for f in list_inputs(p)))
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(
        p
        for p in walk_files(path)
        if suffix(p) in SUFFIXES and "masks" not in p.relative_to(path).parts[:-1]
    )
    if not files:
        raise ValueError(f"no images or volumes ({' '.join(SUFFIXES)}) under {path}")
    return files


def n_pages(path: Path) -> int:
    """B-scans in a TIFF: a multi-page TIFF (or one 3-D image, as tifffile writes a stack) is
    an OCT volume, a single 2-D page a B-scan image; 1 when the file cannot be opened (the
    reader then says why). tifffile where installed (the ``volumes`` extra), else PIL."""
    try:
        import tifffile
    except ImportError:
        tifffile = None
    try:
        if tifffile is not None:
            with tifffile.TiffFile(path) as tf:
                shape = tf.series[0].shape if tf.series else ()
                n = len(tf.pages)
                if n == 1 and len(shape) == 3 and shape[-1] not in (3, 4):  # (n, rows, cols)
                    return int(shape[0])
                return n
        from PIL import Image

        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # unreadable: scored as an image, whose reader reports the error
        return 1


def route(
    files: list[Path], volumes: bool, data: dict, bscan_volumes: bool = False
) -> tuple[list[Path], list[Path], list[tuple]]:
    """(images, volumes, unsupported): the files this checkpoint scores as 2-D images and as
    volumes, and (path, kind, reason) for those it cannot.

    A volume checkpoint takes every file but 2-D image formats (all as volumes). A 2-D
    checkpoint takes images; with ``bscan_volumes`` (a retina-normalised B-scan checkpoint,
    which scores a volume B-scan by B-scan) also volume files, a multi-page TIFF among them;
    without it a volume file, or a multi-page TIFF, is unsupported (never its first page
    scored as if it were the whole file).
    """
    images, vols, unsupported = [], [], []
    trained_on = str(data.get("_target_", "2-D B-scans")).rsplit(".", 1)[-1]
    for p in files:
        kind = suffix(p)
        if volumes:
            if kind in IMAGE_SUFFIXES and kind not in VOLUME_SUFFIXES:
                reason = (
                    "a 2-D image; this checkpoint was trained on OCT volumes (data=oct_volume) "
                    f"and scores volume files ({' '.join(VOLUME_SUFFIXES)})"
                )
                unsupported.append((p, "image", reason))
            else:
                vols.append(p)
            continue
        is_volume = kind in VOLUME_SUFFIXES and (
            kind not in IMAGE_SUFFIXES or n_pages(p) > 1  # .tif/.tiff: by its page count
        )
        if not is_volume:
            images.append(p)
        elif bscan_volumes:
            vols.append(p)
        else:
            reason = (
                f"an OCT volume; this checkpoint was trained on 2-D B-scans ({trained_on}) with "
                "center crops, which score single images; volumes are scored B-scan by B-scan "
                "by retina-normalised checkpoints (data.resize=retina, the default) or by one "
                "trained with data=oct_volume"
            )
            unsupported.append((p, "volume", reason))
    return images, vols, unsupported


class ScanItems(Dataset):
    """A B-scan dataset's items for prediction: an unreadable file becomes an error item (a
    CSV row) rather than a gap in the batch."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        try:
            item = self.ds.item(i)
        except Exception as e:  # any decoder error: reported in the CSV, the rest goes on
            return {"id": str(self.ds.paths[i]), "error": f"{type(e).__name__}: {e}"}
        return {"id": item["id"], "x": item["x"]}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "x" in it]
    return {
        "x": torch.stack([it["x"] for it in good]) if good else None,
        "id": [it["id"] for it in good],
        "errors": [(it["id"], it["error"]) for it in items if "error" in it],
    }


def load_checkpoint(ckpt: str | Path, device: torch.device) -> tuple:
    """The method (class from the checkpoint), its weights and threshold, in eval mode, and
    the checkpoint's record (``checkpoint["anogan_lightning"]``: class, data config,
    preprocessing, provenance); for an exported file (.onnx, .pt TorchScript) its
    :class:`~anogan_lightning.exported.ExportedScorer` and its sidecar."""
    ckpt = Path(ckpt)
    if ckpt.suffix.lower() in EXPORT_SUFFIXES:
        scorer, _ = load_exported(ckpt, device)
        return scorer, scorer.meta
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    meta = torch.load(ckpt, map_location="cpu", weights_only=False).get("anogan_lightning")
    if not meta:
        raise ValueError(f"{ckpt} was not written by anogan_lightning.train (no method record)")
    cls = hydra.utils.get_class(meta["class"])
    model = cls.load_from_checkpoint(ckpt, map_location=device)
    return model.eval().to(device), meta


def load_model(ckpt: str | Path, device: torch.device):
    """The model of :func:`load_checkpoint` and the data config it was trained with."""
    model, meta = load_checkpoint(ckpt, device)
    return model, meta.get("data", {})


def image_preprocessing(model, meta: dict) -> BScanPreprocessing:
    """How the checkpoint's model saw a B-scan file (:func:`preprocessing_from_checkpoint`);
    ValueError if its input size is not the model's."""
    prep = preprocessing_from_checkpoint(meta)
    size = model.hparams.get("image_size")
    if size is not None and int(size) != prep.image_size:
        raise ValueError(f"the model takes {size}-px inputs, its preprocessing {prep.image_size}")
    return prep


def _cell(v) -> str | int:
    """A CSV cell: floats to 8 significant digits, NaN and None empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.8g}" if isinstance(v, float) else v


class Rows:
    """Rows of predictions.csv and (volume checkpoints) bscans.csv, flushed per file."""

    def __init__(self, files, bscans, names: list[str], threshold: float) -> None:
        self.threshold, self._fh = threshold, [fh for fh in (files, bscans) if fh is not None]
        cols = ["path", "status", "kind", "score", *names, "anomalous", "threshold", "rule"]
        cols += ["bscans", "anomalous_bscans", "patches", "anomalous_patches"]
        self.files = csv.DictWriter(files, [*cols, *MAP_COLUMNS, "error"])
        self.files.writeheader()
        self.bscans = None
        if bscans is not None:
            cols = ["path", "bscan", "score", *names, "anomalous", "threshold", "patches"]
            cols += ["anomalous_patches", "heatmap", "boundaries", "unreliable_columns", "error"]
            self.bscans = csv.DictWriter(bscans, cols)
            self.bscans.writeheader()

    def file(self, path, status: str, kind: str, **values) -> None:
        if status == "ok":
            values["threshold"] = self.threshold
        self.files.writerow(
            {"path": str(path), "status": status, "kind": kind}
            | {k: _cell(v) for k, v in values.items()}
        )

    def bscan(self, path, **values) -> None:
        if "error" not in values:
            values["threshold"] = self.threshold
        self.bscans.writerow({"path": str(path)} | {k: _cell(v) for k, v in values.items()})

    def flush(self) -> None:
        for fh in self._fh:
            fh.flush()


def _retina_outputs(scored, i: int, k: int, path, title: str, cfg, out: Path) -> dict:
    """B-scan ``i``'s map on its scan: ``maps/<k>_<name>.npy`` (``maps=true``) and the overlay
    ``heatmaps/<k>_<name>.png`` (``heatmaps=true``) at the scan's resolution; returns the CSV
    values (``unreliable_columns``, ``map``)."""
    g = scored.ds.geometry(i)
    values = {"unreliable_columns": int(g.unreliable_columns().sum())}
    if scored.maps is None or not (cfg.heatmaps or cfg.get("maps", True)):
        return values
    amap, bad = pb.scan_map(scored, i, g)
    name = f"{k:06d}_{figures.safe_name(stem(path))}"
    if cfg.get("maps", True):
        (out / "maps").mkdir(exist_ok=True)
        np.save(out / "maps" / f"{name}.npy", amap)
        values["map"] = f"maps/{name}.npy"
    if cfg.heatmaps:
        scan = to_unit_range_scan(scored.ds._scan(i))
        figures.save_overlay(out / "heatmaps" / f"{name}.png", scan, amap, title=title, shade=bad)
    return values


def to_unit_range_scan(a: np.ndarray) -> np.ndarray:
    """A scan for display, [-1, 1]: uint8 as is, other dtypes by their 0.5/99.5 percentiles."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 127.5 - 1.0
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a.astype(np.float32) - lo) / max(float(hi - lo), 1e-6) * 2 - 1, -1, 1)


def _predict_retina(
    model, files: list[Path], prep: BScanPreprocessing, cfg, device, rows: Rows, out: Path
):
    """Score B-scan files of a ``resize=retina`` checkpoint one at a time
    (:func:`anogan_lightning.predict_bscans.score_bscans`), each map carried back onto its
    scan; returns (scored, unreadable)."""
    names, threshold = list(model.components), rows.threshold
    n_ok = n_bad = 0
    for path in tqdm(files, desc="scoring", unit="scan"):
        ds = prep.eval_dataset([path], [0], [""], None, None, keep_geometry=True)  # as at test
        ds.preload(threads=1)
        if ds.n_skipped:  # unreadable, or the retina checks failed: the reason names the file
            log.warning("skipping B-scan %s", ds.failures[0])
            rows.file(path, "unreadable", "image", error=ds.failures[0])
            n_bad += 1
            continue
        scored = pb.score_bscans(model, ds, prep, cfg.batch_size, device)
        s = float(scored.score[0])
        values = {n: float(scored.components[n][0]) for n in names}
        flag = None if math.isnan(threshold) else int(s >= threshold)
        title = f"{path}\nscore {s:.4g} ({prep.aggregate} of {scored.windows[0]} windows)" + (
            "" if flag is None else f" ({'anomalous' if flag else 'normal'})"
        )
        values |= _retina_outputs(scored, 0, n_ok, path, title, cfg, out)
        rows.file(
            path,
            "ok",
            "image",
            score=s,
            anomalous=flag,
            rule=IMAGE_RULE,
            patches=int(scored.windows[0]),
            **values,
        )
        n_ok += 1
        rows.flush()
    return n_ok, n_bad


def _predict_bscan_volumes(
    model,
    files: list[Path],
    prep: BScanPreprocessing,
    cfg,
    device,
    rows: Rows,
    out: Path,
    start: int = 0,
):
    """Score OCT volumes with a B-scan (``resize=retina``) checkpoint, B-scan by B-scan
    (:mod:`anogan_lightning.predict_bscans`): ``bscans.csv`` rows, the volume row, and per
    volume ``heatmaps/<k>_<name>/``: ``enface.png`` / ``enface.npy`` and the
    ``max_bscan_heatmaps`` highest-scoring B-scans on their scans; returns (scored,
    unreadable)."""
    names, threshold, cap = list(model.components), rows.threshold, cfg.max_bscan_heatmaps
    reduce = cfg.get("enface", "mean")
    n_ok = n_bad = 0
    for path in tqdm(files, desc="scoring", unit="volume"):
        try:
            vol = read_volume(path)
        except (VolumeReadError, MissingExtraError) as e:
            log.warning("skipping unreadable volume %s: %s", path, e)
            rows.file(path, "unreadable", "volume", error=str(e))
            n_bad += 1
            continue
        try:
            scored, source = pb.score_volume(vol, model, prep, cfg.batch_size, device)
        except pb.NoBScanScored as e:
            log.warning("skipping volume %s: %s", path, e)
            rows.file(path, "unreadable", "volume", error=str(e))
            n_bad += 1
            continue
        ds = scored.ds
        failed = {pb.bscan_index(f.split(": ", 1)[0]): f for f in ds.failures}
        n_b = vol.data.shape[0]
        folder = out / "heatmaps" / f"{start + n_ok:06d}_{figures.safe_name(stem(path))}"
        per_bscan, geometry = [], {}
        for i, name in enumerate(ds.image_ids):
            b = pb.bscan_index(name)
            g = geometry[b] = ds.geometry(i)
            s = float(scored.score[i])
            per_bscan.append(
                {
                    "bscan": b,
                    "i": i,
                    "score": s,
                    **{n: float(scored.components[n][i]) for n in names},
                    "anomalous": None if math.isnan(threshold) else int(s >= threshold),
                    "patches": int(scored.windows[i]),
                    "boundaries": "file" if ds.boundaries[i] is not None else "detected",
                    "unreliable_columns": int(g.unreliable_columns().sum()),
                }
            )
        drawn, has_maps = {}, scored.maps is not None
        enface = pb.enface_map(scored, vol.data.shape, reduce) if has_maps else None
        if has_maps and cfg.get("maps", True):
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "enface.npy", enface)
        if cfg.heatmaps and has_maps:
            figures.save_enface(
                folder / "enface.png",
                enface,
                vol.spacing,
                f"{Path(path).name}: en-face anomaly map ({reduce} over ILM..BM)",
            )
            top = sorted(per_bscan, key=lambda r: -r["score"])
            for r in top[:cap] if cap is not None else top:
                i, b = r["i"], r["bscan"]
                amap, bad = pb.scan_map(scored, i, geometry[b])
                flag = {None: "", 0: " (normal)", 1: " (anomalous)"}[r["anomalous"]]
                drawn[b] = figures.save_overlay(
                    folder / f"bscan_{b:03d}.png",
                    to_unit_range_scan(vol.data[b]),
                    amap,
                    title=f"{Path(path).name}  B-scan {b}: score {r['score']:.4g}{flag}",
                    shade=bad,
                )
        for r in per_bscan:
            heat = drawn.get(r["bscan"])
            r.pop("i")
            rows.bscan(path, heatmap=str(heat.relative_to(out)) if heat else "", **r)
        for b, why in sorted(failed.items()):
            rows.bscan(path, bscan=b, error=why, boundaries=source)
        best = max(per_bscan, key=lambda r: r["score"])
        n_anom = sum(1 for r in per_bscan if r["anomalous"])
        rows.file(
            path,
            "ok",
            "volume",
            score=best["score"],
            **{n: best[n] for n in names},
            anomalous=best["anomalous"],
            rule=pb.VOLUME_RULE,
            bscans=n_b,
            anomalous_bscans=None if math.isnan(threshold) else n_anom,
            patches=int(scored.windows.sum()),
            boundaries=source,
            unreliable_columns=sum(r["unreliable_columns"] for r in per_bscan),
            map=str((folder / "enface.npy").relative_to(out))
            if (folder / "enface.npy").is_file()
            else "",
        )
        rows.flush()
        n_ok += 1
    return n_ok, n_bad


def _predict_images(model, files: list[Path], meta: dict, cfg, device, rows: Rows, out: Path):
    """Score 2-D images in batches (through the datasets the checkpoint's test data took);
    returns (scored, unreadable)."""
    prep = image_preprocessing(model, meta)
    if prep.resize == "retina":
        return _predict_retina(model, files, prep, cfg, device, rows, out)
    if not files:
        return 0, 0
    n = len(files)
    ds = ScanItems(prep.eval_dataset(files, [0] * n, [""] * n, None, None))  # centre crops
    loader = DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate
    )
    names, threshold = list(model.components), rows.threshold
    n_ok = n_bad = 0
    for batch in tqdm(loader, desc="scoring", unit="batch"):
        for path, err in batch["errors"]:
            log.warning("skipping unreadable image %s: %s", path, err)
            rows.file(path, "unreadable", "image", error=err)
            n_bad += 1
        if batch["x"] is None:
            continue
        x = batch["x"].to(device)
        with torch.inference_mode(not model.needs_grad_at_test):
            res = model.score({"x": x, "id": batch["id"]})
        score = res["score"].detach().float().cpu()
        for i, path in enumerate(batch["id"]):
            s = float(score[i])
            flag = None if math.isnan(threshold) else int(s >= threshold)
            comps = {n: float(res[n][i]) for n in names}
            rows.file(path, "ok", "image", score=s, anomalous=flag, rule=IMAGE_RULE, **comps)
            if cfg.heatmaps and "amap" in res:
                figures.save_heatmap(
                    out / "heatmaps" / f"{n_ok:06d}_{figures.safe_name(Path(path).stem)}.png",
                    x[i].detach().float().cpu(),
                    res["amap"][i].detach().float().cpu(),
                    f"{path}\nscore {s:.4g}"
                    + ("" if flag is None else f" ({'anomalous' if flag else 'normal'})"),
                )
            n_ok += 1
        rows.flush()
    return n_ok, n_bad


def _predict_volumes(model, files: list[Path], dm, cfg, device, rows: Rows, out: Path):
    """Score OCT volumes one at a time; returns (scored, unreadable)."""
    size = int(model.hparams.get("image_size", dm.image_size))
    if size != dm.image_size:
        raise ValueError(f"the model takes {size}-px patches, its data config {dm.image_size}")
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=out))  # prepared volumes, deleted
    loader = DataLoader(
        pv.VolumeFiles(files, dm, scratch),
        batch_size=None,
        num_workers=cfg.num_workers,
        collate_fn=pv.as_is,
        prefetch_factor=1 if cfg.num_workers > 0 else None,  # at most num_workers volumes ahead
    )
    threshold, cap = rows.threshold, cfg.max_bscan_heatmaps
    draw = bool(cfg.heatmaps) and (cap is None or cap > 0)  # stitch maps only to draw them
    n_ok = n_bad = 0
    try:
        for item in tqdm(loader, desc="scoring", unit="volume"):
            path = item["path"]
            if "error" in item:
                log.warning("skipping unreadable volume %s: %s", path, item["error"])
                rows.file(path, "unreadable", "volume", error=item["error"])
                n_bad += 1
                continue
            try:
                patches = PatchDataset(item["dirs"][1])
                vs = pv.score_volume(model, patches, cfg.batch_size, device, draw)
                per_bscan = pv.bscan_rows(vs, threshold)
                maps = {}
                if draw:
                    folder = out / "heatmaps" / f"{n_ok:06d}_{figures.safe_name(stem(path))}"
                    maps = figures.write_volume_heatmaps(
                        folder, vs.maps, vs.patches.image, per_bscan, cap, Path(path).name
                    )
            finally:
                pv.remove(item["dirs"])
            rows.file(path, "ok", "volume", rule=pv.RULE, **pv.volume_row(vs, per_bscan, threshold))
            for r in per_bscan:
                heatmap = maps.get(r["bscan"])
                rows.bscan(path, heatmap=str(heatmap.relative_to(out)) if heatmap else "", **r)
            rows.flush()
            n_ok += 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return n_ok, n_bad


def write_provenance(path: Path, ckpt: str, training: dict, calibration: dict | None) -> None:
    """The model's training provenance (from its checkpoint), its site calibration
    (:mod:`anogan_lightning.calibrate`, where it has one) and this scoring run's own."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    info = {
        "checkpoint": str(Path(ckpt).resolve()),
        "training": training,
        "calibration": calibration,
        "predict": {
            **provenance.code(),
            **provenance.software_and_machine(),
            **provenance.command(overrides),
        },
    }
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")


def predict(cfg: DictConfig) -> Path:
    """Score every input file; returns the path of predictions.csv."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    model, meta = load_checkpoint(cfg.ckpt, device)
    data = meta.get("data", {})
    dm = pv.volume_datamodule(data, cfg.get("spacing_x_um"))
    prep = None if dm is not None else image_preprocessing(model, meta)
    bscan_volumes = prep is not None and prep.resize == "retina"
    images, volumes, unsupported = route(
        list_inputs(cfg.input), dm is not None, data, bscan_volumes
    )
    threshold = float(cfg.threshold) if cfg.threshold is not None else float(model.threshold)
    if math.isnan(threshold):
        log.warning("the checkpoint has no validation threshold: the anomalous column is empty")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.heatmaps:
        (out / "heatmaps").mkdir(exist_ok=True)
    calibration = meta.get("calibration")
    if calibration and cfg.threshold is None:
        log.info(
            "threshold %.6g: site-calibrated on %d normal scans of %s (specificity %s)",
            threshold,
            calibration["n_scored"],
            calibration["normals"],
            calibration["specificity_target"],
        )
    write_provenance(out / "provenance.json", cfg.ckpt, model.provenance, calibration)
    if cfg.get("model_card"):
        model_card.write(cfg.ckpt, out / model_card.NAME)
    with ExitStack() as stack:
        fh = stack.enter_context(open(out / "predictions.csv", "w", newline=""))
        bscans = None
        if volumes:
            bscans = stack.enter_context(open(out / "bscans.csv", "w", newline=""))
        rows = Rows(fh, bscans, list(model.components), threshold)
        for path, kind, reason in unsupported:
            log.warning("skipping unsupported file %s: %s", path, reason)
            rows.file(path, "unsupported", kind, error=reason)
        rows.flush()
        n_ok = n_bad = 0
        if dm is not None:
            n_ok, n_bad = _predict_volumes(model, volumes, dm, cfg, device, rows, out)
        else:
            if images:
                n_ok, n_bad = _predict_images(model, images, meta, cfg, device, rows, out)
            if volumes:
                k, b = _predict_bscan_volumes(
                    model, volumes, prep, cfg, device, rows, out, start=n_ok + n_bad
                )
                n_ok, n_bad = n_ok + k, n_bad + b
    what = f"{len(volumes)} volume(s)" if dm is not None else "file(s)"
    print(
        f"scored {n_ok} {what}, {n_bad} unreadable, {len(unsupported)} unsupported; "
        f"predictions: {out / 'predictions.csv'}"
    )
    return out / "predictions.csv"


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (FileNotFoundError, ValueError, MissingExtraError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
