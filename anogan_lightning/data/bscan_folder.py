"""B-scans in folders or a CSV: ``data=bscan_folder``, the generic B-scan data module.

Two ways to list the scans (:data:`~anogan_lightning.data.bscan.io.IMAGE_SUFFIXES`, any case;
symbolic links to folders and files are followed):

- class folders (``csv=null``): ``<root>/<split>/<CLASS>/...`` with splits ``train``, ``val``,
  ``test`` (the Kermany layout), or ``<root>/<CLASS>/...`` without splits. ``NORMAL`` (any case;
  ``normal_labels``) is label 0, every other folder label 1; the folder name is kept as the
  class.
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
(the Sparse-GAN protocol's patient-disjoint hold-out of ``val_normal`` NORMAL and
``val_abnormal`` disease scans from train), ``test`` (``val_fraction`` of the test groups), or
``auto``: the first of these that has scans. Every split is group-disjoint
(:mod:`anogan_lightning.data.splits`). Training uses the NORMAL scans of train only; without
any, the module is for evaluation (``fit=false ckpt_path=...``) and ``train_dataloader`` says so.

Preprocessing (``image_size``, ``resize``, ``retina``, ``crop_flatten``, ``fill_white``, windows,
aggregation, map region): one :class:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing`
(``self.preprocessing``) builds every dataset, as it builds prediction's. ``preload``: read (and
normalise) every scan once in :meth:`setup`; ``cache_dir``: normalised bands kept on disk.
:meth:`check` lists the scans without reading them, to fail before training on a wrong root.
The constructor's defaults are ``conf/data/bscan_folder.yaml``'s.

Examples (``../shared/data``)::

    data=bscan_folder data.root=../shared/data/mexico-dme        # test/NORMAL, test/DME
    data=bscan_folder data.root=../shared/data/duke-dme-fluid data.csv=manifest.csv \\
        data.path_column=file data.label_column=has_fluid data.group_column=subject \\
        data.image_dir=images data.mask_dir=masks data.pool_split=[0,0.2,0.8]
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from anogan_lightning.data.base import AnomalyDataModule
from anogan_lightning.data.bscan.crop import CROPS
from anogan_lightning.data.bscan.io import IMAGE_SUFFIXES, check_listed, list_images, read_listing
from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing
from anogan_lightning.data.splits import patient_id, split_by_patient, split_groups

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Scan:
    path: Path
    cls: str  # class name
    normal: bool  # label 0
    mask: Path | None
    group: str | None
    split: str  # train, val, test or pool


def group_key(s: Scan) -> str:
    """The split unit of a scan: its group, or the file alone."""
    return s.group if s.group is not None else f"file {s.path}"


class BScanFolderDataModule(AnomalyDataModule):
    """B-scans in class folders or a CSV, optional masks and groups; see the module docstring."""

    VAL_FROM: tuple[str, ...] = ("auto", "val", "train", "test")
    NAME = "bscan_folder"  # in log lines

    def __init__(
        self,
        root: str,
        *,
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
        image_size: int = 64,
        val_normal: int = 1000,
        val_abnormal: int = 3000,
        resize: str = "retina",
        train_crop: str = "random",
        preload: bool = True,
        crop_flatten: bool = False,
        fill_white: bool = True,
        retina: dict | None = None,
        window_stride: int | None = 32,
        aggregate: str = "topk",
        top_k: int = 3,
        map_region: str = "retina",
        cache_dir: str | None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, num_workers, pin_memory)
        self.preprocessing = BScanPreprocessing.from_data_config(
            {
                "image_size": image_size,
                "resize": resize,
                "retina": retina,
                "crop_flatten": crop_flatten,
                "fill_white": fill_white,
                "window_stride": window_stride,
                "aggregate": aggregate,
                "top_k": top_k,
                "map_region": map_region,
            }
        )
        for arg, value, allowed in (
            ("val_from", val_from, self.VAL_FROM),
            ("train_crop", train_crop, CROPS),
        ):
            if value not in allowed:
                raise ValueError(f"{arg}={value!r}; expected one of {allowed}")
        if val_normal < 0 or val_abnormal < 0:
            raise ValueError("val_normal and val_abnormal must be >= 0")
        if resize == "retina" and not preload:
            raise ValueError("resize='retina' normalises every scan once: it needs preload=true")
        if len(pool_split) != 3 or min(pool_split) < 0 or sum(pool_split) <= 0:
            raise ValueError(f"pool_split={pool_split}: three non-negative fractions")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        self.save_hyperparameters()
        self.root = Path(root)
        self.csv = csv
        self.columns = (path_column, label_column, mask_column, group_column, split_column)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.normal_labels = {str(v).upper() for v in normal_labels}
        total = float(sum(pool_split))
        self.pool_split = tuple(float(f) / total for f in pool_split)
        self.val_fraction = val_fraction
        self.val_from = val_from
        self.val_normal = val_normal
        self.val_abnormal = val_abnormal
        self.train_crop = train_crop
        self.preload = preload
        self.cache_dir = cache_dir
        self.seed = seed
        self._scans: list[Scan] | None = None
        self._val_groups: set[str] | None = None  # val_from=test: the held-out test groups

    @property
    def n_skipped(self) -> int:
        """Unreadable images skipped so far (in this process)."""
        sets = (self.train_set, self.val_set, self.test_set)
        return sum(ds.n_skipped for ds in sets if ds is not None)

    # -- listing ------------------------------------------------------------------------------
    @property
    def base(self) -> Path:
        """The folder that scan paths are relative to."""
        return self.root / (self.image_dir or "")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist (set data.root)")

    def _mask_for(self, rel: Path) -> Path | None:
        if self.mask_dir is None:
            return None
        base = self.root / self.mask_dir
        for cand in (base / rel, base / rel.name):
            for c in (cand, *(cand.with_suffix(s) for s in IMAGE_SUFFIXES)):
                if c.is_file():
                    return c
        return None

    def _is_normal(self, cls: str) -> bool:
        return cls.upper() in self.normal_labels

    @staticmethod
    def _split_of(rel: Path) -> str:
        first = rel.parts[0].lower() if len(rel.parts) > 1 else ""
        return first if first in SPLITS else "pool"

    def _from_folders(self) -> list[Scan]:
        base = self.base
        scans = []
        for p in list_images(base):
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
            scans.append(
                Scan(p, cls, self._is_normal(cls), self._mask_for(rel), patient_id(p), split)
            )
        if not scans:
            raise ValueError(
                f"{base} holds no B-scans ({' '.join(IMAGE_SUFFIXES)}) in class folders"
            )
        return scans

    def _from_csv(self) -> list[Scan]:
        path_col, label_col, mask_col, group_col, split_col = self.columns
        table = self.root / self.csv
        rows = read_listing(
            table,
            (path_col, label_col, mask_col, group_col, split_col),
            "B-scan list {table} does not exist (data.csv)",
        )
        base = self.base
        scans, missing = [], []
        for i, row in enumerate(rows, 2):
            rel = Path(row[path_col].strip())
            p = base / rel
            if not p.is_file():
                missing.append(f"{p} (row {i})")
                continue
            value = row[label_col].strip()
            normal = self._is_normal(value)
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
        check_listed(table, missing)
        if not scans:
            raise ValueError(f"{table} lists no B-scans")
        return scans

    def _assign_pool(self, scans: list[Scan]) -> list[Scan]:
        pool = [s for s in scans if s.split == "pool"]
        if not pool:
            return scans
        parts = split_groups([group_key(s) for s in pool], self.pool_split, self.seed)
        where = {g: split for split, part in zip(SPLITS, parts, strict=True) for g in part}
        return [s if s.split != "pool" else replace(s, split=where[group_key(s)]) for s in scans]

    def scans(self) -> list[Scan]:
        """Every listed scan with its split decided (pool assigned by groups)."""
        if self._scans is None:
            self._check_root()
            scans = self._from_csv() if self.csv else self._from_folders()
            self._scans = self._assign_pool(scans)
        return self._scans

    def _scans_of(self, split: str) -> list[Scan]:
        return [s for s in self.scans() if s.split == split]

    def check(self, stage: str | None = None) -> dict[str, int]:
        """List the scans that ``stage`` needs ("test"/"predict": the test split; otherwise
        every split) without reading them: FileNotFoundError or ValueError naming the missing
        root, folder, CSV or file, so a wrong ``data.root`` fails before training. Returns the
        number of scans per split."""
        self._check_root()
        splits = ("test",) if stage in ("test", "predict") else SPLITS
        return {k: n for k in splits if (n := len(self._scans_of(k)))}

    # -- splits -------------------------------------------------------------------------------
    def _val_and_train(self) -> tuple[list[Scan], list[Scan]]:
        source = self.val_from
        if source == "auto":
            if self._scans_of("val"):
                source = "val"
            elif any(not s.normal for s in self._scans_of("train")):
                source = "train"
            else:
                source = "test"
        train_all = self._scans_of("train")
        train = [s for s in train_all if s.normal]
        if source == "val":
            return self._scans_of("val"), train
        if source == "train":
            paths = {s.path: s for s in train_all}
            group = {s.path: s.group for s in train_all}
            tr, vn, va = split_by_patient(
                [s.path for s in train_all if s.normal],
                [s.path for s in train_all if not s.normal],
                self.val_normal,
                self.val_abnormal,
                self.seed,
                group_of=group.get,
            )
            return [paths[p] for p in vn + va], [paths[p] for p in tr]
        test = self._scans_of("test")  # val_from=test: a fraction of the test groups
        held = split_groups([group_key(s) for s in test], (self.val_fraction, 1.0), self.seed)[0]
        self._val_groups = held
        return [s for s in test if group_key(s) in held], train

    def _test_scans(self) -> list[Scan]:
        if self.val_from in ("auto", "test") and self._val_groups is None:
            self._val_and_train()  # which test groups validation holds out
        held = self._val_groups or set()
        return [s for s in self._scans_of("test") if group_key(s) not in held]

    def _dataset(self, scans: list[Scan], crop: str | None) -> Dataset:
        """Training items at ``crop`` (random/center), or val/test items (``crop=None``)."""
        paths = [s.path for s in scans]
        labels = [0 if s.normal else 1 for s in scans]
        classes = [s.cls for s in scans]
        masks = [s.mask for s in scans]
        p = self.preprocessing
        if crop is None:
            return p.eval_dataset(paths, labels, classes, masks, self.cache_dir)
        return p.train_dataset(paths, labels, classes, masks, crop, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Index the splits ``stage`` needs (fit/validate: train+val; test/predict: test) and,
        with ``preload``, read them."""
        t0 = time.perf_counter()
        self._check_root()
        fit = stage in (None, "fit", "validate")
        test = stage in (None, "test", "predict")
        if stage == "fit":
            self.check()  # a missing test split fails now rather than after training
        new = []
        if fit and self.train_set is None:
            val, train = self._val_and_train()
            self.train_set = self._dataset(train, self.train_crop)
            self.val_set = self._dataset(val, None)
            new += [("train", self.train_set), ("val", self.val_set)]
        if test and self.test_set is None:
            self.test_set = self._dataset(self._test_scans(), None)
            new.append(("test", self.test_set))
        if not new:
            return
        if self.preload:
            for name, ds in new:
                ds.preload(name)
        for name, ds in new:
            windows = f", {len(ds)} windows" if getattr(ds, "aggregate", None) else ""
            counts = dict(sorted(Counter(ds.classes).items()))
            log.info("%s %s: %d images%s %s", self.NAME, name, len(ds.classes), windows, counts)
        if self.n_skipped:
            log.warning("%s: skipped %d unreadable or failed image(s)", self.NAME, self.n_skipped)
        log.info("%s setup(%s) took %.1f s", self.NAME, stage, time.perf_counter() - t0)
        if stage in (None, "fit") and not len(self.train_set.paths):
            log.warning(
                "%s %s: no NORMAL training scans; evaluation only (fit=false "
                "ckpt_path=<model.ckpt>)",
                self.NAME,
                self.root,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is not None and not len(self.train_set.paths):
            raise ValueError(
                f"{self.NAME} {self.root}: no NORMAL scans in the train split to train on; "
                "score a trained model with fit=false ckpt_path=<run>/checkpoints/model.ckpt"
            )
        return super().train_dataloader()
