"""Calibrate a trained model for a new site from that site's *normal* scans:
``python -m anogan_lightning.calibrate ckpt=<model.ckpt> normals=<folder | list.csv>``.

A site has no labelled disease scans, but it always has normal ones. This command takes a
training run's checkpoint and a folder (searched as ``predict`` searches one) or a CSV (a
``path`` column; relative paths against the CSV's folder) of the site's normal scans and writes
a site-calibrated checkpoint:

1. optionally (``adabn=true``, ``map_norm=true``) the statistics the score depends on are
   re-estimated on the normals, every window or crop of them as the model's test data saw them
   (:class:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing` of the checkpoint):
   the batch-norm running statistics of the layers the reconstruction runs through (AdaBN,
   :func:`~anogan_lightning.calibration.adapt_batch_norm`) and the residual normaliser of the
   ``zscore``/``dark_z`` maps (:meth:`~anogan_lightning.methods.base.AnomalyModule.fit_map_norm`).
   Both are off by default: whether they help is measured per method, on validation
   (experiments/README.md, "Site calibration");
2. the normals are scored by :func:`anogan_lightning.predict.predict` itself on that model, so
   the threshold is set on exactly the scores ``predict`` will give the site's scans;
3. the threshold is set at ``specificity`` of them
   (:func:`~anogan_lightning.calibration.threshold_at_specificity`): with n normals the
   specificity reached on the site's other normals scatters by about sqrt(s (1 - s) / n), which
   is why fewer than ``min_normals`` is refused.

The written checkpoint is a training checkpoint with the new threshold (and statistics) and a
record ``checkpoint["anogan_lightning"]["calibration"]``: the source checkpoint, the site, the
scans (folder or CSV, count, digest of their names and sizes), when, the target specificity and
the one reached on the calibration scans, the thresholds before and after, the statistics
re-estimated. ``predict``, ``export`` and the model card use it like any other checkpoint and
show the record. Scans that cannot be scored (unreadable, retina not found) are left out with a
warning and counted; the calibration stops if fewer than ``min_normals`` remain.

Writes into the run directory (``outputs/calibrate/<date>_<time>/``): ``model.ckpt`` (the
calibrated model), ``calibration.json`` (the record) and ``scores.csv`` (the normals'
``predictions.csv``, with the calibrated threshold).
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from anogan_lightning import provenance
from anogan_lightning.calibration import adapt_batch_norm, threshold_at_specificity
from anogan_lightning.extras import MissingExtraError

log = logging.getLogger("anogan_lightning.calibrate")


def list_normals(normals: str | Path) -> list[Path]:
    """The site's normal scans: every scan file under a folder (as ``predict`` lists them), one
    file, or the ``path`` column of a CSV (relative paths against the CSV's folder). A listed
    file that does not exist is an error naming it."""
    from anogan_lightning.predict import list_inputs

    normals = Path(normals)
    if normals.suffix.lower() != ".csv":
        return list_inputs(normals)
    if not normals.is_file():
        raise FileNotFoundError(f"normals list {normals} does not exist")
    with open(normals, newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(
                f"{normals}: expected a CSV with a 'path' column, one normal scan a row"
            )
        files = [Path(r["path"]) for r in reader if r["path"].strip()]
    files = [f if f.is_absolute() else normals.parent / f for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{normals} lists {len(missing)} missing file(s): {'; '.join(missing[:5])}"
        )
    if not files:
        raise ValueError(f"{normals}: no scans listed")
    return files


def normal_batches(model, meta: dict, files: list[Path], batch_size: int, device):
    """The normals' inputs as the model's test data saw them (every window of a retina band,
    or each scan's crop), in batches ``{"x": ...}`` on ``device``; unreadable scans are left
    out (the datasets' preload drops them with a warning)."""
    from anogan_lightning.predict import image_preprocessing

    prep = image_preprocessing(model, meta)
    n = len(files)
    ds = prep.eval_dataset(files, [0] * n, ["NORMAL"] * n, None, None)
    ds.preload("calibration", threads=1)
    for batch in DataLoader(ds, batch_size=batch_size):
        yield {"x": batch["x"].to(device)}


def score_normals(ckpt: Path, files: list[Path], out: Path, cfg: DictConfig) -> np.ndarray:
    """The normals' scores as ``predict`` gives them on ``ckpt`` (its predictions.csv kept in
    ``out/predict``); scans that could not be scored are left out with a warning."""
    from anogan_lightning.predict import predict

    pcfg = OmegaConf.create(
        {
            "ckpt": str(ckpt),
            "input": [str(f) for f in files],
            "output_dir": str(out / "predict"),
            "batch_size": cfg.batch_size,
            "num_workers": 0,
            "device": cfg.device,
            "heatmaps": False,
            "max_bscan_heatmaps": 0,
            "threshold": None,
            "spacing_x_um": None,
            "model_card": False,
        }
    )
    with open(predict(pcfg), newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        log.warning("calibration scan not scored: %s (%s)", r["path"], r["error"])
    return np.array([float(r["score"]) for r in rows if r["status"] == "ok"], dtype=np.float64)


def check_normals(n: int, cfg: DictConfig, what: str) -> None:
    if n < int(cfg.min_normals):
        raise ValueError(
            f"{cfg.normals}: {n} normal scans {what}; calibration needs at least "
            f"min_normals={cfg.min_normals} (with n normals the specificity reached on the "
            "site's other normals scatters by about sqrt(s(1-s)/n))"
        )


def calibrate(cfg: DictConfig) -> Path:
    """Write the site-calibrated checkpoint (see the module docstring); returns its path."""
    from anogan_lightning.predict import load_checkpoint

    src = Path(cfg.ckpt)
    if src.suffix.lower() != ".ckpt":
        raise ValueError(
            f"calibrate takes a model.ckpt of a training run, not {src.name} (calibrate the "
            "checkpoint, then export the calibrated one)"
        )
    spec = float(cfg.specificity)
    if not 0.0 < spec < 1.0:
        raise ValueError(f"specificity={spec} must lie strictly between 0 and 1")
    files = list_normals(cfg.normals)
    check_normals(len(files), cfg, "listed")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    model, meta = load_checkpoint(src, device)
    if meta.get("data", {}).get("_target_", "").endswith("OCTVolumeDataModule"):
        raise ValueError(
            f"{src}: calibrate takes B-scan (2-D) checkpoints; this one scores volumes"
        )
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    before = float(model.threshold)
    done = []
    if cfg.adabn or cfg.map_norm:
        if model.reconstruct is None:
            raise ValueError(
                f"adabn/map_norm: {type(model).__name__} has no reconstruction network whose "
                "statistics could be re-estimated (they apply to the reconstruction methods)"
            )
        if cfg.adabn:
            batches = (b["x"] for b in normal_batches(model, meta, files, cfg.batch_size, device))
            done.append(f"adabn ({adapt_batch_norm(model, model.reconstruct, batches)} batches)")
        if cfg.map_norm:
            model.fit_map_norm(
                normal_batches(model, meta, files, cfg.batch_size, device), max_batches=10**9
            )
            done.append("map_norm")
        state = model.state_dict()
        ckpt["state_dict"] = {k: state[k].detach().cpu() for k in ckpt["state_dict"]}
    staged = out / "model.ckpt"
    torch.save(ckpt, staged)  # the adapted model: the normals are scored on it, by predict
    scores = score_normals(staged, files, out, cfg)
    check_normals(len(scores), cfg, f"scored (of {len(files)} listed)")
    threshold = threshold_at_specificity(scores, spec)
    record = {
        "source_checkpoint": str(src.resolve()),
        "site": cfg.site,
        "normals": str(Path(cfg.normals).resolve()),
        "n_listed": len(files),
        "n_scored": int(len(scores)),
        "scans_digest": provenance.file_list_digest([str(f) for f in files])[1],
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "specificity_target": spec,
        "specificity_on_calibration_scans": float((scores < threshold).mean()),
        "threshold_before": before,
        "threshold": threshold,
        "statistics": done,
    }
    ckpt["state_dict"]["threshold"] = torch.tensor(threshold, dtype=torch.float64)
    ckpt["anogan_lightning"]["calibration"] = record
    torch.save(ckpt, staged)
    (out / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    _rewrite_scores(out / "predict" / "predictions.csv", out / "scores.csv", threshold)
    print(
        f"calibrated on {len(scores)} normal scans of {cfg.normals}: threshold {before:.6g} -> "
        f"{threshold:.6g} (specificity {spec} on these scans"
        + (f"; re-estimated: {', '.join(done)}" if done else "")
        + f"); model: {staged}"
    )
    return staged


def _rewrite_scores(src: Path, dst: Path, threshold: float) -> None:
    """The normals' predictions.csv with the calibrated threshold and decisions."""
    with open(src, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, cols = list(reader), reader.fieldnames or []
    for r in rows:
        if r["status"] == "ok":
            r["threshold"] = f"{threshold:.8g}"
            r["anomalous"] = int(float(r["score"]) >= threshold)
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)
    src.unlink()
    if not any(src.parent.iterdir()):
        src.parent.rmdir()


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    try:
        calibrate(cfg)
    except (FileNotFoundError, ValueError, MissingExtraError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
