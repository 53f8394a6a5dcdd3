"""A test set of whole OCT volumes for a B-scan (``resize=retina``) model, one score per volume.

Most clinical OCT is a volume, while the Kermany-style models are trained on single B-scans.
This set lets a training run (an ``extra_test`` entry, or ``fit=false`` on a trained model)
score labelled volumes with such a model, as ``predict`` does
(:mod:`anogan_lightning.predict_bscans`):

- each volume's B-scans are normalised and scored as the model's test B-scans were (the run's
  :class:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing`), with the file's own
  ILM/BM where the reader returns them and detected otherwise;
- the volume's score is its highest B-scan score (``predict``'s ``max B-scan score >=
  threshold``: the validation threshold is a B-scan threshold); the score components are
  those of that B-scan;
- the metrics are the usual image-level ones (AUROC with CI, AP, at the validation threshold,
  per class) over volumes, under ``test_<name>/``; ``scores_<name>.csv`` has one row per volume
  (``id`` = the file) with ``bscans`` (B-scans scored) and ``max_bscan`` (the index of the
  highest-scoring one).

Layout: ``<root>/<CLASS>/<volume file>`` (class folders at any depth below ``root``, the first
folder naming the class; ``normal_labels`` as in ``bscan_folder``), or ``csv=<file under root>``
with ``path_column`` and ``label_column``. Volume files: ``.vol``, ``.e2e``, ``.npy``,
``.npz``, ``.tif``/``.tiff`` (multi-page), NIfTI (:func:`~anogan_lightning.data.readers.read_volume`;
``.vol``/``.e2e``/NIfTI/TIFF need the ``volumes`` extra).

A volume that cannot be read, or none of whose B-scans passes the retina checks, is left out
with its reason in the log; the split is then ``partial`` with ``dropped`` (as a B-scan split
with failed scans). It is scored on the model's device, outside the Lightning test loop (under
DDP every process scores the whole set; rank 0 writes it).

Example (``conf/experiment/cross_device.yaml`` style)::

    extra_test:
      volumes:
        _target_: anogan_lightning.data.bscan_volumes.BScanVolumeTestSet
        root: /data/volumes          # /data/volumes/NORMAL/*.vol, /data/volumes/AMD/*.vol
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from anogan_lightning.data.bscan.io import check_listed, read_listing, walk_files
from anogan_lightning.data.readers import VOLUME_SUFFIXES, VolumeReadError, read_volume, suffix
from anogan_lightning.evaluation import metrics as image_metrics
from anogan_lightning.evaluation.collector import NOT_SCORED, OK, PARTIAL
from anogan_lightning.extras import MissingExtraError

log = logging.getLogger(__name__)


class BScanVolumeTestSet:
    """Labelled OCT volumes scored volume by volume by a B-scan model (see the module)."""

    NAME = "bscan_volumes"
    #: scored by :meth:`score`, not by a Lightning test loop (train.py's extra test sets)
    volume_level = True

    def __init__(
        self,
        root: str,
        csv: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        normal_labels: tuple[str, ...] = ("NORMAL", "0", "false"),
        resize: str | None = None,
        eval_batch_size: int | None = None,
        batch_size: int = 64,
        **_training_data,  # the run's other data keys (extra_test merges them in): unused
    ) -> None:
        self.root = Path(root)
        self.csv = csv
        self.path_column, self.label_column = path_column, label_column
        self.normal_labels = {str(v).upper() for v in normal_labels}
        self.resize = resize
        self.batch_size = int(eval_batch_size or batch_size)
        self._volumes: list[tuple[Path, str]] | None = None

    # -- listing ------------------------------------------------------------------------------
    def _is_normal(self, cls: str) -> bool:
        return cls.upper() in self.normal_labels

    def _from_folders(self) -> list[tuple[Path, str]]:
        out = []
        for p in walk_files(self.root):
            if suffix(p) not in VOLUME_SUFFIXES:
                continue
            rel = p.relative_to(self.root)
            if len(rel.parts) < 2:
                raise ValueError(
                    f"{p}: not in a class folder (expected {self.root}/<CLASS>/<file>)"
                )
            out.append((p, rel.parts[0]))
        return out

    def _from_csv(self) -> list[tuple[Path, str]]:
        table = self.root / self.csv
        rows = read_listing(
            table, (self.path_column, self.label_column), "volume list {table} does not exist (csv)"
        )
        out, missing = [], []
        for i, row in enumerate(rows, 2):
            p = self.root / row[self.path_column].strip()
            if not p.is_file():
                missing.append(f"{p} (row {i})")
            value = row[self.label_column].strip()
            out.append((p, "NORMAL" if self._is_normal(value) else value))
        check_listed(table, missing)
        return out

    def volumes(self) -> list[tuple[Path, str]]:
        """(file, class) of every listed volume, sorted by path."""
        if self._volumes is None:
            self.check()
        return self._volumes

    def check(self, stage: str | None = None) -> dict[str, int]:
        """List the volumes without reading them (before training): FileNotFoundError or
        ValueError naming the root, the CSV, a missing file, a model that is not a retina
        B-scan model, or a set without both classes. Returns the count per class."""
        if self.resize != "retina":
            raise ValueError(
                f"{self.root}: volumes are scored B-scan by B-scan by a resize=retina model; "
                f"this run's data has resize={self.resize}"
            )
        if not self.root.is_dir():
            raise FileNotFoundError(f"volume test set root {self.root} does not exist")
        vols = sorted(self._from_csv() if self.csv else self._from_folders())
        if not vols:
            where = self.root / self.csv if self.csv else f"{self.root}/<CLASS>/"
            raise ValueError(f"{where} holds no volume files ({' '.join(VOLUME_SUFFIXES)})")
        labels = {self._is_normal(c) for _, c in vols}
        if len(labels) < 2:
            only = "normal" if True in labels else "anomalous"
            raise ValueError(f"{self.root}: only {only} volumes; the AUROC needs both classes")
        self._volumes = vols
        return dict(sorted(Counter(c for _, c in vols).items()))

    def setup(self, stage: str | None = None) -> None:
        self.volumes()

    def split_summary(self) -> dict[str, dict[str, int]]:
        """Volumes per class, as the data modules' summaries count images."""
        vols = self.volumes()
        n_normal = sum(self._is_normal(c) for _, c in vols)
        return {"test": {"normal": n_normal, "anomalous": len(vols) - n_normal}}

    # -- scoring ------------------------------------------------------------------------------
    def score(self, model, prep, split: str = "test") -> tuple[dict, dict]:
        """Score every volume with ``model`` (its B-scans through ``prep``, the run's B-scan
        preprocessing): (metrics under ``<split>/``, the record that ``scores_<name>.csv``
        and the results file read)."""
        from anogan_lightning import predict_bscans as pb

        if prep is None or prep.resize != "retina":
            raise ValueError(f"{self.root}: volumes need a resize=retina B-scan model")
        names = list(model.components)
        device = model.device
        ids, labels, classes, scores, n_bscans, best_b = [], [], [], [], [], []
        comps: dict[str, list[float]] = {n: [] for n in names}
        failed = []
        was_training = model.training
        model.eval()
        try:
            for path, cls in self.volumes():
                try:
                    vol = read_volume(path)
                except (VolumeReadError, MissingExtraError) as e:
                    failed.append(f"{path}: {e}")
                    continue
                try:
                    scored, _ = pb.score_volume(vol, model, prep, self.batch_size, device)
                except pb.NoBScanScored as e:
                    failed.append(f"{path}: {e}")
                    continue
                ds = scored.ds
                i = int(np.argmax(scored.score))
                ids.append(str(path))
                labels.append(0 if self._is_normal(cls) else 1)
                classes.append(cls)
                scores.append(float(scored.score[i]))
                for n in names:
                    comps[n].append(float(scored.components[n][i]))
                n_bscans.append(len(ds.image_ids))
                best_b.append(pb.bscan_index(ds.image_ids[i]))
        finally:
            model.train(was_training)
        for why in failed:
            log.warning("volume test set: left out %s", why)
        labels_t = torch.tensor(labels, dtype=torch.long)
        score_t = torch.tensor(scores, dtype=torch.float64)
        comp_t = {n: torch.tensor(v, dtype=torch.float64) for n, v in comps.items()}
        status, reason = OK, ""
        if failed:
            status = PARTIAL
            reason = f"{len(failed)} of {len(self.volumes())} volumes left out (first: {failed[0]})"
        if not image_metrics.has_both_classes(labels_t):
            status = NOT_SCORED
            reason = f"the scored volumes ({len(ids)}) lack a class" + (
                f"; {reason}" if reason else ""
            )
        threshold = float(model.threshold)
        out: dict = {}
        if status != NOT_SCORED:
            out = image_metrics.evaluate(
                score_t,
                labels_t,
                split,
                comp_t,
                threshold if math.isfinite(threshold) else None,
                classes,
            )
        out[f"{split}/status"] = status
        if status != OK:
            out[f"{split}/reason"] = reason
        if failed and status == PARTIAL:
            out[f"{split}/dropped"] = len(failed)
        out[f"{split}/bscans"] = float(sum(n_bscans))
        record = {
            "ids": ids,
            "labels": labels_t,
            "classes": classes or None,
            "score": score_t,
            "components": comp_t,
            "references": {
                "bscans": torch.tensor(n_bscans, dtype=torch.float64),
                "max_bscan": torch.tensor(best_b, dtype=torch.float64),
            },
            "columns": [*names, "bscans", "max_bscan"],
            "pixel": None,
        }
        return out, record
