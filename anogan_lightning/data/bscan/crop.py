"""Whole B-scans as one square image each: the papers' protocol (``resize="crop"`` or
``"squash"``).

``crop``: each image is resized to height ``image_size`` keeping its aspect ratio, then a
square of width ``image_size`` is cropped from it: the centre for val/test, a random horizontal
position for train (``train_crop="random"``; ``"center"`` for a fixed crop). Images narrower
than tall after the height resize are padded symmetrically in width with the image's minimum
value (the dark background). ``squash`` resizes straight to (S, S) instead; it leaks the
width (Kermany's widths, 384 to 1536 columns, separate normal from diseased scans better than
chance, experiments/notes/2026-12-01-figures-behind-design-choices.md) and is there only for
comparison.

Flattening (``crop_flatten``): every B-scan is first flattened on its detected Bruch's
membrane (:func:`anogan_lightning.data.retina.normalize.flatten_bscan`), as the AnoGAN paper
does for its volumes, so curvature and tilt do not have to be modelled as normal variation.
Registration fill (``fill_white``): the white wedges of rotated scans are set to the scan's
dark background before the resize (:func:`anogan_lightning.data.bscan.io.blank_fill`).

Loading. JPEGs are decoded at a reduced DCT scale (``PIL.Image.draft``) and converted to
grayscale. With :meth:`CropBScanDataset.preload` every image is read once and kept as its
height-resized uint8 strip (S, W >= S), so random crops still work; all strips of a split share
one array. Without it images are read in ``__getitem__``. An unreadable file is skipped with a
warning naming it and counted in ``n_skipped``: at preload, otherwise ``__getitem__`` returns
None and :func:`~anogan_lightning.data.base.collate_skip_none` drops it from the batch (counts
made in DataLoader worker processes stay there; the collate logs those).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from anogan_lightning.data.bscan.io import concat_columns, read_all, read_image
from anogan_lightning.data.transforms import crop_square, to_unit_range

if TYPE_CHECKING:
    from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing

#: training crop positions (``train_crop``); val/test take the centre
CROPS = ("random", "center")


class CropBScanDataset(Dataset):
    """Image files with labels; items ``{"x": (1, S, S) float32 in [-1, 1], "label", "id",
    "cls"}`` (``cls``: the class folder name, for per-class metrics). Built by
    :meth:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing.train_dataset` /
    ``eval_dataset``.

    Args:
        crop: ``"random"`` (horizontal position drawn from torch's RNG) or ``"center"``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        preprocessing: BScanPreprocessing,
        crop: str,
    ) -> None:
        assert len(paths) == len(labels) == len(classes)
        pre = preprocessing  # validated there
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.classes = list(classes)  # class folder name per item, for per-class metrics
        self.image_size = pre.image_size
        self.resize = pre.resize
        self.crop = crop
        self.flatten = pre.crop_flatten
        self.fill_white = pre.fill_white
        self.n_skipped = 0
        self._bad: set[Path] = set()
        self._strips: np.ndarray | None = None  # (S, sum of widths) uint8 when preloaded
        self._offsets: np.ndarray | None = None  # (N + 1,) column offsets into _strips

    def __len__(self) -> int:
        return len(self.paths)

    def strip(self, i: int) -> np.ndarray:
        """The uint8 strip (S, W >= S) of image ``i``; raises if its file is unreadable."""
        if self._strips is not None:
            return self._strips[:, self._offsets[i] : self._offsets[i + 1]]
        return read_image(
            self.paths[i], self.image_size, self.resize, self.flatten, self.fill_white
        )

    def _read(self, i: int) -> np.ndarray | None:
        path = self.paths[i]
        try:
            return self.strip(i)
        except Exception as e:  # any decoder error: one bad file must not stop an epoch
            if path not in self._bad:
                self._bad.add(path)
                self.n_skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None

    def preload(self, name: str = "", threads: int | None = None) -> None:
        """Read every image once; unreadable files are dropped (warned and counted)."""
        strips = read_all(self._read, len(self.paths), name, threads)
        keep = [i for i, a in enumerate(strips) if a is not None]
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        self.classes = [self.classes[i] for i in keep]
        self._strips, self._offsets = concat_columns(
            [strips[i] for i in keep], self.image_size, np.uint8
        )

    def item(self, i: int) -> dict:
        """Item ``i``; raises if its file is unreadable (``__getitem__`` skips it instead)."""
        return self._item(i, self.strip(i))

    def _item(self, i: int, a: np.ndarray) -> dict:
        left = None
        if self.crop == "random" and a.shape[1] > self.image_size:
            left = int(torch.randint(a.shape[1] - self.image_size + 1, ()))
        x = torch.from_numpy(to_unit_range(crop_square(a, left)))[None]  # (1, S, S)
        return {
            "x": x,
            "label": int(self.labels[i]),
            "id": str(self.paths[i]),
            "cls": self.classes[i],
        }

    def __getitem__(self, i: int) -> dict | None:
        a = self._read(i)
        if a is None:
            return None  # dropped by collate_skip_none
        return self._item(i, a)
