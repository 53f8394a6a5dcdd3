"""Kermany OCT2017 retinal OCT B-scans: train on NORMAL, validate and test on NORMAL vs disease.

A preset of :class:`~anogan_lightning.data.bscan_folder.BScanFolderDataModule` (every setting
but the layout and ``val_from`` is its; ``conf/data/kermany.yaml`` inherits
``bscan_folder.yaml``).

Layout: ``<root>/train``, ``<root>/test`` and optionally ``<root>/val``, each with class folders
(CNV, DME, DRUSEN, NORMAL; any folder other than NORMAL counts as disease) holding the image
files, usually named ``CLASS-PATIENT-N.jpeg``. A missing train/ or test/ folder, a split folder
without class folders or a class folder without images is an error naming it.

Protocol (Sparse-GAN, Zhou et al., ISBI 2020): the training set is the NORMAL images of
``train/`` minus a validation hold-out of ``val_normal`` NORMAL and ``val_abnormal`` disease
images also drawn from ``train/`` (1000 and 3000 in the paper); ``test/`` is the test set. Labels:
0 normal, 1 anomalous. The hold-out is seeded and patient-disjoint
(:func:`~anogan_lightning.data.splits.split_by_patient`): files are grouped by the patient number
in ``CLASS-PATIENT-N`` (the same number in two class folders is one patient; names without it,
e.g. ``normal_train_1234.jpg``, are a group each) and no patient is in both train and val. With
``val_from="val"`` the ``<root>/val`` folder is used as it is instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from anogan_lightning.data.bscan.io import IMAGE_SUFFIXES, is_image
from anogan_lightning.data.bscan_folder import BScanFolderDataModule, Scan
from anogan_lightning.data.splits import patient_id

log = logging.getLogger(__name__)

NORMAL = "NORMAL"


def list_split(split_dir: str | Path) -> dict[str, list[Path]]:
    """Class folder name -> sorted image paths of one split folder (links followed).

    Raises FileNotFoundError if the folder is missing and ValueError if it has no class folders
    or a class folder holds no images.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist")
    classes = {}
    for d in sorted(split_dir.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        files = sorted(p for p in d.iterdir() if is_image(p) and p.is_file())
        if not files:
            raise ValueError(f"class folder {d} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        classes[d.name] = files
    if not classes:
        raise ValueError(f"split folder {split_dir} has no class folders (e.g. NORMAL, CNV)")
    return classes


class KermanyDataModule(BScanFolderDataModule):
    """Kermany OCT2017 with the Sparse-GAN protocol; see the module docstring."""

    VAL_FROM = ("train", "val")
    NAME = "kermany"

    def __init__(self, root: str, *, val_from: str = "train", **bscan_folder) -> None:
        super().__init__(root, val_from=val_from, **bscan_folder)
        if self.csv is not None:
            raise ValueError(
                f"data=kermany lists the class folders of {self.root}/train, test and val; "
                "a CSV list of scans is data=bscan_folder's (data.csv)"
            )
        self._listed: dict[str, list[Scan]] = {}

    def _split_dir(self, name: str) -> Path:
        d = self.base / name
        if not d.is_dir():
            hint = " (val_from='val' needs it; use val_from='train')" if name == "val" else ""
            raise FileNotFoundError(f"Kermany split folder {d} does not exist{hint}")
        return d

    def _scans_of(self, split: str) -> list[Scan]:
        """The scans of ``<root>/<split>``, listed once (only the splits a stage needs)."""
        if split not in self._listed:
            if split == "val" and self.val_from != "val":
                return []  # <root>/val is read only with val_from=val
            self._check_root()
            base = self.base
            self._listed[split] = [
                Scan(
                    p,
                    c,
                    self._is_normal(c),
                    self._mask_for(p.relative_to(base)),
                    patient_id(p),
                    split,
                )
                for c, ps in list_split(self._split_dir(split)).items()
                for p in ps
            ]
        return self._listed[split]

    def scans(self) -> list[Scan]:
        return [s for split in ("train", "val", "test") for s in self._scans_of(split)]

    def check(self, stage: str | None = None) -> dict[str, int]:
        self._check_root()
        splits = ("test",) if stage in ("test", "predict") else ("train", "val", "test")
        return {k: n for k in splits if (n := len(self._scans_of(k)))}

    def _val_and_train(self) -> tuple[list[Scan], list[Scan]]:
        train_dir = self._split_dir("train")
        if not any(s.normal for s in self._scans_of("train")):
            raise ValueError(f"no NORMAL images in {train_dir} (expected {train_dir / NORMAL})")
        val, train = super()._val_and_train()
        if self.val_from == "val":
            shared = {s.group for s in train} & {s.group for s in val} - {None}
            if shared:
                log.warning("kermany: %d patient(s) in both train/ and val/", len(shared))
        elif not train:
            raise ValueError(f"no NORMAL images of {train_dir} are left for training")
        return val, train
