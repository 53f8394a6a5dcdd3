"""Kermany OCT2017 retinal OCT B-scans: train on NORMAL, validate and test on NORMAL vs disease.

Layout: ``<root>/train``, ``<root>/test`` and optionally ``<root>/val``, each with class folders
(CNV, DME, DRUSEN, NORMAL; any folder other than NORMAL counts as disease). Files are ``.jpeg``,
``.jpg`` or ``.png`` (any case), usually named ``CLASS-PATIENT-N.jpeg``.

Protocol (Sparse-GAN, Zhou et al., ISBI 2020): the training set is the NORMAL images of
``train/`` minus a validation hold-out of ``val_normal`` NORMAL and ``val_abnormal`` disease
images also drawn from ``train/`` (1000 and 3000 in the paper); ``test/`` is the test set. Labels:
0 normal, 1 anomalous. The hold-out is seeded and patient-disjoint: files are grouped by the
patient number in ``CLASS-PATIENT-N`` (the same number in two class folders is one patient;
names without it, e.g. ``normal_train_1234.jpg``, are a group each) and no patient is in both
train and val. With ``val_from="val"`` the ``<root>/val`` folder is used as it is instead.

Resize policy. Kermany B-scans are 496 rows high but 384 to 1536 columns wide, and the width
alone separates normal from diseased scans better than chance (AUROC ~0.6). Squashing every
width to a square would let acquisition geometry masquerade as anatomy, so by default
(``resize="crop"``) each image is resized to height ``image_size`` keeping its aspect ratio, then
a square of width ``image_size`` is cropped from it: the centre for val/test, a random horizontal
position for train (``train_crop="random"``; ``"center"`` for a fixed crop). Images narrower
than tall after the height resize are padded symmetrically in width with the image's minimum
value (the dark background). ``resize="squash"`` resizes straight to (S, S) instead; it leaks the
width and is there only for comparison.

Flattening (``flatten=True``): every B-scan is first flattened on its detected Bruch's
membrane (:func:`anogan_lightning.data.preprocess.flatten_bscan`), as the AnoGAN paper does for
its volumes, so curvature and tilt do not have to be modelled as normal variation. It costs
about 0.07 s of CPU per image (done once when preloading).

Registration fill (``fill_white=True``, default): 164 of kermany-mini's 500 test scans carry
saturated white wedges where the scanner's registration rotated the frame, and every method's
score correlates with the wedge area (Spearman 0.4-0.5) although it says nothing about the
retina. The wedges are set to the scan's dark background before the resize, so acquisition
geometry does not pass for anatomy (as with the width, above).

Loading. JPEGs are decoded at a reduced DCT scale (``PIL.Image.draft``) and converted to
grayscale. With ``preload=True`` every image is read once in :meth:`setup` and kept as its
height-resized uint8 strip (S, W >= S), so random crops still work; all strips of a split share
one array. With ``preload=False`` images are read in ``__getitem__``. An unreadable file is skipped
with a warning naming it and counted in ``n_skipped``: at setup when preloading, otherwise
``__getitem__`` returns None and :func:`collate_skip_none` drops it from the batch (counts made
in DataLoader worker processes stay there; the collate logs those).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from anogan_lightning.data.base import AnomalyDataModule
from anogan_lightning.data.preprocess import fill_mask, flatten_bscan
from anogan_lightning.data.transforms import (
    crop_square,
    fit_height,
    pad_width,
    squash,
    to_unit_range,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
NORMAL = "NORMAL"
_KERMANY_NAME = re.compile(r"^[A-Za-z]+-(\d+)-\d+$")  # CLASS-PATIENT-N


def patient_id(path: str | Path) -> str | None:
    """Patient number of a ``CLASS-PATIENT-N`` file name, else None."""
    m = _KERMANY_NAME.match(Path(path).stem)
    return m.group(1) if m else None


def list_split(split_dir: str | Path) -> dict[str, list[Path]]:
    """Class folder name -> sorted image paths of one split folder.

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
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"class folder {d} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        classes[d.name] = files
    if not classes:
        raise ValueError(f"split folder {split_dir} has no class folders (e.g. NORMAL, CNV)")
    return classes


def _is_normal(class_name: str) -> bool:
    return class_name.upper() == NORMAL


def split_by_patient(
    normal: Sequence[Path],
    abnormal: Sequence[Path],
    val_normal: int,
    val_abnormal: int,
    seed: int,
) -> tuple[list[Path], list[Path], list[Path]]:
    """Seeded patient-disjoint hold-out: (train NORMAL, val NORMAL, val disease) paths.

    Patients are shuffled; val disease images are taken patient by patient, then val NORMAL
    images, first from patients already in val (their NORMAL scans cannot train anyway). The last
    patient taken may be cut to hit the count exactly; its remaining scans are not used. Train is
    the NORMAL images of every patient not in val. ``val_abnormal`` is capped at the disease
    images available and ``val_normal`` at half the NORMAL images, each with one warning.
    """
    groups: dict[str, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
    for i, paths in enumerate((normal, abnormal)):
        for p in paths:
            pid = patient_id(p)
            groups[f"patient {pid}" if pid is not None else f"file {p}"][i].append(p)
    keys = sorted(groups)
    keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]

    n_abnormal = min(val_abnormal, len(abnormal))
    if n_abnormal < val_abnormal:
        warnings.warn(
            f"val_abnormal={val_abnormal} but only {len(abnormal)} disease images in the "
            f"training folder; using all {n_abnormal}",
            stacklevel=2,
        )
    n_normal = min(val_normal, len(normal) // 2)
    if n_normal < val_normal:
        warnings.warn(
            f"val_normal={val_normal} capped at {n_normal}, half of the {len(normal)} NORMAL "
            "images in the training folder, so that training keeps the other half",
            stacklevel=2,
        )

    val_keys: set[str] = set()
    val_ab: list[Path] = []
    for k in keys:
        if len(val_ab) >= n_abnormal:
            break
        if groups[k][1]:
            val_ab += groups[k][1][: n_abnormal - len(val_ab)]
            val_keys.add(k)
    val_no: list[Path] = []
    for k in [k for k in keys if k in val_keys] + [k for k in keys if k not in val_keys]:
        if len(val_no) >= n_normal:
            break
        if groups[k][0]:
            val_no += groups[k][0][: n_normal - len(val_no)]
            val_keys.add(k)
    train = [p for k in sorted(groups) if k not in val_keys for p in groups[k][0]]
    return sorted(train), sorted(val_no), sorted(val_ab)


def read_image(
    path: str | Path,
    image_size: int,
    resize: str = "crop",
    flatten: bool = False,
    fill_white: bool = False,
) -> np.ndarray:
    """uint8 grayscale: a strip (S, W >= S) for ``resize="crop"``, (S, S) for ``"squash"``.

    ``fill_white``: the near-white wedges that registration leaves at the top or bottom of a
    rotated scan are set to the scan's dark background (10th percentile of its other pixels).
    ``flatten``: every column is shifted so the detected Bruch's membrane is a straight row
    (:func:`anogan_lightning.data.preprocess.flatten_bscan`). Both work on the scan decoded at
    no less than twice the output height, before the resize.
    """
    with Image.open(path) as img:
        if flatten or fill_white:
            if img.format == "JPEG":
                img.draft("L", (1, 2 * image_size))
            a = np.asarray(img.convert("L"))
            if fill_white:
                a = blank_fill(a)
            if flatten:
                a = flatten_bscan(a)
            img = Image.fromarray(a)
        if resize == "squash":
            return squash(img, image_size)
        return pad_width(fit_height(img, image_size), image_size)


def blank_fill(a: np.ndarray) -> np.ndarray:
    """(H, W) uint8 with registration fill (near-white runs touching the top or bottom of a
    column, :func:`anogan_lightning.data.preprocess.fill_mask`) set to the dark background."""
    valid = fill_mask(a)
    if valid.all() or not valid.any():
        return a
    out = a.copy()
    out[~valid] = np.uint8(np.percentile(a[valid], 10))
    return out


class KermanyDataset(Dataset):
    """Image files with labels; items ``{"x": (1, S, S) float32 in [-1, 1], "label", "id",
    "cls"}`` (``cls``: the class folder name, for per-class metrics).

    Args:
        crop: ``"random"`` (horizontal position drawn from torch's RNG) or ``"center"``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        resize: str = "crop",
        crop: str = "center",
        flatten: bool = False,
        fill_white: bool = False,
    ) -> None:
        assert len(paths) == len(labels) == len(classes)
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.classes = list(classes)  # class folder name per item, for per-class metrics
        self.image_size = image_size
        self.resize = resize
        self.crop = crop
        self.flatten = flatten
        self.fill_white = fill_white
        self.n_skipped = 0
        self._bad: set[Path] = set()
        self._strips: np.ndarray | None = None  # (S, sum of widths) uint8 when preloaded
        self._offsets: np.ndarray | None = None  # (N + 1,) column offsets into _strips

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            return read_image(path, self.image_size, self.resize, self.flatten, self.fill_white)
        except Exception as e:  # any decoder error: one bad file must not stop an epoch
            if path not in self._bad:
                self._bad.add(path)
                self.n_skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None

    def preload(self, name: str = "", threads: int | None = None) -> None:
        """Read every image once; unreadable files are dropped (warned and counted)."""
        threads = threads or min(8, os.cpu_count() or 1)
        n = len(self.paths)
        every = max(2000, n // 10)  # progress lines only for large sets
        strips: list[np.ndarray | None] = []
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
            for i, a in enumerate(pool.map(self._read, self.paths), 1):
                strips.append(a)
                if i % every == 0:
                    log.info("kermany %s: loaded %d/%d images", name, i, n)
        keep = [i for i, a in enumerate(strips) if a is not None]
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        self.classes = [self.classes[i] for i in keep]
        kept = [strips[i] for i in keep]
        widths = [a.shape[1] for a in kept]
        self._offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
        s = self.image_size
        self._strips = np.concatenate(kept, axis=1) if kept else np.zeros((s, 0), np.uint8)

    def __getitem__(self, i: int) -> dict | None:
        if self._strips is not None:
            a = self._strips[:, self._offsets[i] : self._offsets[i + 1]]
        else:
            a = self._read(self.paths[i])
            if a is None:
                return None  # dropped by collate_skip_none
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


class KermanyDataModule(AnomalyDataModule):
    """Kermany OCT2017 with the Sparse-GAN protocol; see the module docstring."""

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        val_normal: int = 1000,
        val_abnormal: int = 3000,
        val_from: str = "train",
        resize: str = "crop",
        train_crop: str = "random",
        preload: bool = True,
        flatten: bool = False,
        fill_white: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, num_workers, pin_memory)
        for arg, value, allowed in (
            ("val_from", val_from, ("train", "val")),
            ("resize", resize, ("crop", "squash")),
            ("train_crop", train_crop, ("random", "center")),
        ):
            if value not in allowed:
                raise ValueError(f"{arg}={value!r}; expected one of {allowed}")
        if image_size < 1 or val_normal < 0 or val_abnormal < 0:
            raise ValueError("image_size must be positive and val_normal/val_abnormal >= 0")
        self.save_hyperparameters()
        self.root = Path(root)
        self.val_normal = val_normal
        self.val_abnormal = val_abnormal
        self.val_from = val_from
        self.resize = resize
        self.train_crop = train_crop
        self.preload = preload
        self.flatten = flatten
        self.fill_white = fill_white
        self.seed = seed

    @property
    def n_skipped(self) -> int:
        """Unreadable images skipped so far (in this process)."""
        sets = (self.train_set, self.val_set, self.test_set)
        return sum(ds.n_skipped for ds in sets if ds is not None)

    def _dataset(self, items: list[tuple[Path, str]], crop: str) -> KermanyDataset:
        paths = [p for p, _ in items]
        classes = [c for _, c in items]
        labels = [0 if _is_normal(c) else 1 for c in classes]
        return KermanyDataset(
            paths,
            labels,
            classes,
            self.image_size,
            self.resize,
            crop,
            self.flatten,
            self.fill_white,
        )

    def _split_dir(self, name: str) -> Path:
        d = self.root / name
        if not d.is_dir():
            hint = " (val_from='val' needs it; use val_from='train')" if name == "val" else ""
            raise FileNotFoundError(f"Kermany split folder {d} does not exist{hint}")
        return d

    def _setup_fit(self) -> None:
        train_dir = self._split_dir("train")
        cls = {p: c for c, ps in list_split(train_dir).items() for p in ps}
        normal = [p for p, c in cls.items() if _is_normal(c)]
        if not normal:
            raise ValueError(f"no NORMAL images in {train_dir} (expected {train_dir / NORMAL})")
        if self.val_from == "val":
            train = normal
            val = [(p, c) for c, ps in list_split(self._split_dir("val")).items() for p in ps]
            shared = {patient_id(p) for p in train} & {patient_id(p) for p, _ in val} - {None}
            if shared:
                log.warning("kermany: %d patient(s) in both train/ and val/", len(shared))
        else:
            abnormal = [p for p, c in cls.items() if not _is_normal(c)]
            train, val_no, val_ab = split_by_patient(
                normal, abnormal, self.val_normal, self.val_abnormal, self.seed
            )
            if not train:
                raise ValueError(f"no NORMAL images of {train_dir} are left for training")
            val = [(p, cls[p]) for p in val_no + val_ab]
        self.train_set = self._dataset([(p, cls[p]) for p in train], self.train_crop)
        self.val_set = self._dataset(val, "center")

    def _setup_test(self) -> None:
        items = [(p, c) for c, ps in list_split(self._split_dir("test")).items() for p in ps]
        self.test_set = self._dataset(items, "center")

    def setup(self, stage: str | None = None) -> None:
        """Index the splits ``stage`` needs (fit/validate: train+val; test/predict: test)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Kermany root {self.root} does not exist (set data.root)")
        t0 = time.perf_counter()
        fit = stage in (None, "fit", "validate")
        test = stage in (None, "test", "predict")
        if stage == "fit":
            self._split_dir("test")  # fail now rather than after training
        new = []
        if fit and self.train_set is None:
            self._setup_fit()
            new += [("train", self.train_set), ("val", self.val_set)]
        if test and self.test_set is None:
            self._setup_test()
            new.append(("test", self.test_set))
        if not new:
            return
        if self.preload:
            for name, ds in new:
                ds.preload(name)
        for name, ds in new:
            counts = defaultdict(int)
            for c in ds.classes:
                counts[c] += 1
            log.info("kermany %s: %d images %s", name, len(ds), dict(sorted(counts.items())))
        if self.n_skipped:
            log.warning("kermany: skipped %d unreadable image(s)", self.n_skipped)
        log.info("kermany setup(%s) took %.1f s", stage, time.perf_counter() - t0)
