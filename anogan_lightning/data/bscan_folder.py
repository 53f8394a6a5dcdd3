"""A user's own B-scans: ``data=bscan_folder``, the Kermany protocol on any folder or CSV.

Two ways to list the scans (``.jpeg .jpg .png .tif .bmp``, any case):

- class folders (``csv=null``): ``<root>/<split>/<CLASS>/...`` with splits ``train``, ``val``,
  ``test`` (the Kermany layout), or ``<root>/<CLASS>/...`` without splits. ``NORMAL`` (any case)
  is label 0, every other folder label 1; the folder name is kept as the class.
- a CSV (``csv=<file>``, relative to ``root``): one row per scan, the columns named by
  ``path_column`` (relative to ``root``/``image_dir``), ``label_column`` (``normal_labels``,
  e.g. NORMAL or 0, are label 0; any other value 1: a name is kept as the class, a number
  becomes the column's name), optional ``mask_column``, ``group_column`` (patient / eye id) and
  ``split_column`` (train / val / test). A missing column or file is an error naming it.

Masks: ``mask_column`` or ``mask_dir`` (a mask of the same relative path or file name; non-zero =
lesion, same size as the scan; a scan without one has no lesion). Groups: ``group_column``, else
the ``CLASS-PATIENT-N`` number of Kermany names, else each file alone.

Splits: a scan's split is its ``split_column`` value, else the first folder of its path when it
is train/val/test, else it is in the *pool*, divided by groups (seeded) into train / val / test
by ``pool_split`` fractions. Validation (``val_from``): ``val`` (the val split), ``train``
(Kermany's patient-disjoint hold-out of ``val_normal`` NORMAL and ``val_abnormal`` disease
scans from train), ``test`` (``val_fraction`` of the test groups), or ``auto``: the first of
these that has scans. Training uses the NORMAL scans of train only; without any, the module
is for evaluation (``fit=false ckpt_path=...``) and ``train_dataloader`` says so.

Everything else (``resize``, ``retina``, windows, aggregation, cache) is
:class:`~anogan_lightning.data.kermany.KermanyDataModule`'s: this class is one.

Examples (``../shared/data``)::

    data=bscan_folder data.root=../shared/data/mexico-dme        # test/NORMAL, test/DME
    data=bscan_folder data.root=../shared/data/duke-dme-fluid data.csv=manifest.csv \\
        data.path_column=file data.label_column=has_fluid data.group_column=subject \\
        data.image_dir=images data.mask_dir=masks data.pool_split=[0,0.2,0.8]
"""

from __future__ import annotations

import csv as csv_lib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from anogan_lightning.data.kermany import KermanyDataModule, patient_id, split_by_patient

log = logging.getLogger(__name__)

SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Scan:
    path: Path
    cls: str  # class name; label 0 iff normal
    normal: bool
    mask: Path | None
    group: str | None
    split: str  # train, val, test or pool


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


class BScanFolderDataModule(KermanyDataModule):
    """B-scans in class folders or a CSV, optional masks and groups; see the module docstring."""

    VAL_FROM = ("auto", "val", "train", "test")

    def __init__(
        self,
        root: str,
        csv: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        mask_column: str | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        image_dir: str | None = None,
        mask_dir: str | None = None,
        normal_labels: tuple[str, ...] = ("NORMAL", "0", "false"),
        pool_split: tuple[float, float, float] = (0.6, 0.2, 0.2),
        val_fraction: float = 0.2,
        val_from: str = "auto",
        **kermany,
    ) -> None:
        kermany.setdefault("resize", "retina")  # the whole-scan pipeline unless asked otherwise
        super().__init__(root, val_from=val_from, **kermany)
        if len(pool_split) != 3 or min(pool_split) < 0 or sum(pool_split) <= 0:
            raise ValueError(f"pool_split={pool_split}: three non-negative fractions")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        self.csv = csv
        self.columns = (path_column, label_column, mask_column, group_column, split_column)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.normal_labels = {str(v).upper() for v in normal_labels}
        total = float(sum(pool_split))
        self.pool_split = tuple(float(f) / total for f in pool_split)
        self.val_fraction = val_fraction
        self._scans: list[Scan] | None = None

    # -- listing ------------------------------------------------------------------------------
    def _mask_for(self, rel: Path) -> Path | None:
        if self.mask_dir is None:
            return None
        base = self.root / self.mask_dir
        for cand in (base / rel, base / rel.name):
            for c in (cand, *(cand.with_suffix(s) for s in SUFFIXES)):
                if c.is_file():
                    return c
        return None

    @staticmethod
    def _split_of(rel: Path) -> str:
        first = rel.parts[0].lower() if len(rel.parts) > 1 else ""
        return first if first in SPLITS else "pool"

    def _from_folders(self) -> list[Scan]:
        base = self.root / (self.image_dir or "")
        scans = []
        for p in _images(base):
            rel = p.relative_to(base)
            if self.mask_dir is not None and (self.root / self.mask_dir) in p.parents:
                continue
            split = self._split_of(rel)
            parts = rel.parts[1:] if split != "pool" else rel.parts
            if len(parts) < 2:
                raise ValueError(
                    f"{p}: not in a class folder (expected {base}/[train|val|test/]<CLASS>/<file>)"
                )
            cls = parts[0]
            normal = cls.upper() in self.normal_labels
            scans.append(Scan(p, cls, normal, self._mask_for(rel), patient_id(p), split))
        if not scans:
            raise ValueError(f"{base} holds no B-scans ({' '.join(SUFFIXES)}) in class folders")
        return scans

    def _from_csv(self) -> list[Scan]:
        path_col, label_col, mask_col, group_col, split_col = self.columns
        table = self.root / self.csv
        if not table.is_file():
            raise FileNotFoundError(f"B-scan list {table} does not exist (data.csv)")
        with open(table, newline="") as fh:
            rows = list(csv_lib.DictReader(fh))
        header = list(rows[0]) if rows else []
        for col in (path_col, label_col, mask_col, group_col, split_col):
            if col is not None and col not in header:
                raise ValueError(f"{table}: no column {col!r} (columns: {', '.join(header)})")
        base = self.root / (self.image_dir or "")
        scans, missing = [], []
        for i, row in enumerate(rows, 2):
            rel = Path(row[path_col].strip())
            p = base / rel
            if not p.is_file():
                missing.append(f"{p} (row {i})")
                continue
            value = row[label_col].strip()
            normal = value.upper() in self.normal_labels
            try:
                float(value)
                cls = "NORMAL" if normal else label_col
            except ValueError:
                cls = value
            mask = None
            if mask_col is not None and row[mask_col].strip():
                mask = self.root / row[mask_col].strip()
                if not mask.is_file():
                    missing.append(f"{mask} (mask, row {i})")
            elif self.mask_dir is not None:
                mask = self._mask_for(rel)
            group = row[group_col].strip() if group_col is not None else patient_id(p)
            if split_col is not None:
                split = row[split_col].strip().lower()
                if split not in SPLITS:
                    raise ValueError(f"{table} row {i}: split {split!r} is not one of {SPLITS}")
            else:
                split = self._split_of(rel)
            scans.append(Scan(p, cls, normal, mask, group or None, split))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{table} lists missing files: {'; '.join(missing[:5])}{more}")
        if not scans:
            raise ValueError(f"{table} lists no B-scans")
        return scans

    def _groups(self, scans: list[Scan]) -> list[str]:
        return sorted({s.group if s.group is not None else f"file {s.path}" for s in scans})

    @staticmethod
    def _key(s: Scan) -> str:
        return s.group if s.group is not None else f"file {s.path}"

    def _assign_pool(self, scans: list[Scan]) -> list[Scan]:
        pool = [s for s in scans if s.split == "pool"]
        if not pool:
            return scans
        groups = self._groups(pool)
        order = [groups[i] for i in np.random.default_rng(self.seed).permutation(len(groups))]
        n_train = round(self.pool_split[0] * len(order))
        n_val = round(self.pool_split[1] * len(order))
        where = {g: "train" for g in order[:n_train]}
        where.update({g: "val" for g in order[n_train : n_train + n_val]})
        where.update({g: "test" for g in order[n_train + n_val :]})
        return [s if s.split != "pool" else _with_split(s, where[self._key(s)]) for s in scans]

    def scans(self) -> list[Scan]:
        """Every listed scan with its split decided (pool assigned by groups)."""
        if self._scans is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"B-scan root {self.root} does not exist (set data.root)")
            scans = self._from_csv() if self.csv else self._from_folders()
            self._scans = self._assign_pool(scans)
        return self._scans

    # -- splits -------------------------------------------------------------------------------
    def _make(self, scans: list[Scan], crop: str):
        return self._dataset([(s.path, s.cls) for s in scans], crop, [s.mask for s in scans])

    def _val_and_train(self) -> tuple[list[Scan], list[Scan]]:
        by = {k: [s for s in self.scans() if s.split == k] for k in SPLITS}
        source = self.val_from
        if source == "auto":
            if by["val"]:
                source = "val"
            elif any(not s.normal for s in by["train"]):
                source = "train"
            else:
                source = "test"
        train = [s for s in by["train"] if s.normal]
        if source == "val":
            return by["val"], train
        if source == "train":
            paths = {s.path: s for s in by["train"]}
            group = {s.path: s.group for s in by["train"]}
            tr, vn, va = split_by_patient(
                [s.path for s in by["train"] if s.normal],
                [s.path for s in by["train"] if not s.normal],
                self.val_normal,
                self.val_abnormal,
                self.seed,
                group_of=group.get,
            )
            return [paths[p] for p in vn + va], [paths[p] for p in tr]
        groups = self._groups(by["test"])  # val_from=test: a fraction of the test groups
        order = [groups[i] for i in np.random.default_rng(self.seed).permutation(len(groups))]
        held = set(order[: round(self.val_fraction * len(order))])
        self._val_groups = held
        return [s for s in by["test"] if self._key(s) in held], train

    def _setup_fit(self) -> None:
        val, train = self._val_and_train()
        self.train_set = self._make(train, self.train_crop)
        self.val_set = self._make(val, "grid")

    def _setup_test(self) -> None:
        if self.val_from in ("auto", "test") and not hasattr(self, "_val_groups"):
            self._val_and_train()  # which test groups validation holds out
        held = getattr(self, "_val_groups", set())
        test = [s for s in self.scans() if s.split == "test" and self._key(s) not in held]
        self.test_set = self._make(test, "grid")

    def _check_layout(self) -> None:
        self.scans()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.train_set is not None and not len(self.train_set.paths):
            log.warning(
                "bscan_folder %s: no NORMAL training scans; evaluation only (fit=false "
                "ckpt_path=<model.ckpt>)",
                self.root,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is not None and not len(self.train_set.paths):
            raise ValueError(
                f"bscan_folder {self.root}: no NORMAL scans in the train split to train on; "
                "score a trained model with fit=false ckpt_path=<run>/checkpoints/model.ckpt"
            )
        return super().train_dataloader()


def _with_split(s: Scan, split: str) -> Scan:
    return Scan(s.path, s.cls, s.normal, s.mask, s.group, split)
