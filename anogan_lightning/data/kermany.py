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
alone separates normal from diseased scans better than chance (experiments/README.md). Squashing
every width to a square would let acquisition geometry masquerade as anatomy. The Hydra configs
(``data=kermany``, ``data=bscan_folder``) default to ``resize="retina"``: each B-scan normalised
on its retina and scored whole as windows (:class:`RetinaBScanDataset`). This class's own
default, ``resize="crop"`` (the papers' whole-image protocol): each image is resized to height
``image_size`` keeping its aspect ratio, then a square of width ``image_size`` is cropped from it: the centre for val/test, a random horizontal
position for train (``train_crop="random"``; ``"center"`` for a fixed crop). Images narrower
than tall after the height resize are padded symmetrically in width with the image's minimum
value (the dark background). ``resize="squash"`` resizes straight to (S, S) instead; it leaks the
width and is there only for comparison.

Flattening (``flatten=True``): every B-scan is first flattened on its detected Bruch's
membrane (:func:`anogan_lightning.data.preprocess.flatten_bscan`), as the AnoGAN paper does for
its volumes, so curvature and tilt do not have to be modelled as normal variation; with
``preload=True`` it runs once per image.

Registration fill (``fill_white=True``, default): rotated scans carry saturated white wedges
where the scanner's registration turned the frame, and left alone every method's score follows
the wedge area (experiments/README.md), which says nothing about the retina. The wedges are
set to the scan's dark background before the resize, so acquisition geometry does not pass for
anatomy (as with the width, above).

Loading. JPEGs are decoded at a reduced DCT scale (``PIL.Image.draft``) and converted to
grayscale. With ``preload=True`` every image is read once in :meth:`setup` and kept as its
height-resized uint8 strip (S, W >= S), so random crops still work; all strips of a split share
one array. With ``preload=False`` images are read in ``__getitem__``. An unreadable file is skipped
with a warning naming it and counted in ``n_skipped``: at setup when preloading, otherwise
``__getitem__`` returns None and :func:`collate_skip_none` drops it from the batch (counts made
in DataLoader worker processes stay there; the collate logs those).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from anogan_lightning.data import preprocess as pp
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
FILL_WHITE = (
    True  # the one default of fill_white: read_image, KermanyDataset, the DataModule, predict
)


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
    group_of: Callable[[Path], str | None] = patient_id,
) -> tuple[list[Path], list[Path], list[Path]]:
    """Seeded patient-disjoint hold-out: (train NORMAL, val NORMAL, val disease) paths.

    Patients are shuffled; val disease images are taken patient by patient, then val NORMAL
    images, first from patients already in val (their NORMAL scans cannot train anyway). The last
    patient taken may be cut to hit the count exactly; its remaining scans are not used. Train is
    the NORMAL images of every patient not in val. ``val_abnormal`` is capped at the disease
    images available and ``val_normal`` at half the NORMAL images, each with one warning.
    ``group_of`` gives a file's patient (default: the ``CLASS-PATIENT-N`` number; None: the
    file is a group of its own).
    """
    groups: dict[str, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
    for i, paths in enumerate((normal, abnormal)):
        for p in paths:
            pid = group_of(p)
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
    fill_white: bool = FILL_WHITE,
) -> np.ndarray:
    """uint8 grayscale: a strip (S, W >= S) for ``resize="crop"``, (S, S) for ``"squash"``.

    ``fill_white``: the near-white wedges that registration leaves at the top or bottom of a
    rotated scan are set to the scan's dark background (10th percentile of its other pixels).
    ``flatten``: every column is shifted so the detected Bruch's membrane is a straight row
    (:func:`anogan_lightning.data.preprocess.flatten_bscan`). Both work on the scan decoded at
    no less than twice the output height, before the resize. ``resize="retina"`` has no strip
    of this kind (its scans are bands of windows): :class:`RetinaBScanDataset` reads those.
    """
    if resize not in ("crop", "squash"):
        raise ValueError(
            f"read_image: resize={resize!r} is not a single-image policy; retina-normalised "
            "scans are scored as whole-scan windows (RetinaBScanDataset)"
        )
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
        fill_white: bool = FILL_WHITE,
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


# ------------------------------------------------------------------------------ retina windows


def read_gray(path: str | Path) -> np.ndarray:
    """A B-scan file as uint8 grayscale (H, W), full resolution."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def read_mask_image(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask image as uint8 {0, 1} (non-zero = lesion); ValueError naming it if its shape
    differs from the scan's ``shape``."""
    with Image.open(path) as img:
        m = np.asarray(img.convert("L")) != 0
    if m.shape != tuple(shape):
        raise ValueError(
            f"mask {path} is {m.shape[0]}x{m.shape[1]}, its scan {shape[0]}x{shape[1]}"
        )
    return m.astype(np.uint8)


def window_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Window starts covering ``length`` (the last flush with the end); [0] when it fits once."""
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return np.array(starts, dtype=np.int64)


AGGREGATIONS = ("max", "mean", "topk", "map_retina")
#: ``map_region`` values: where a stitched anomaly map may be non-zero. "retina": from the ILM to
#: Bruch's membrane (every lesion the maps are for, fluid, drusen, CNV, lies between them; the
#: band's margins of vitreous and choroid only add speckle and shadows), "band": everywhere
MAP_REGIONS = ("retina", "band")


def retina_norm(retina: dict | None, fill_white: bool = FILL_WHITE) -> pp.RetinaNorm:
    """:class:`~anogan_lightning.data.preprocess.RetinaNorm` from a data config's ``retina``
    keys (``fill_white`` unless they set it); an unknown key is an error naming it."""
    retina = dict(retina or {})
    if retina.get("intensity_percentiles") is not None:
        retina["intensity_percentiles"] = tuple(retina["intensity_percentiles"])
    try:
        return pp.RetinaNorm(**{"fill_white": fill_white, **retina})
    except TypeError as e:
        raise ValueError(f"retina: {e} (keys: RetinaNorm's fields)") from None


class RetinaBScanDataset(Dataset):
    """Retina-normalised B-scans (:func:`anogan_lightning.data.preprocess.normalize_bscan`) as
    ``image_size`` windows.

    ``mode``: ``"random"`` (training: one window per B-scan and item, anywhere in the band,
    position from torch's RNG), ``"center"`` (the centre window) or ``"grid"`` (val/test: every
    window, ``stride`` apart and flush with the band's edges, one item each). Items: ``x``
    (1, S, S) in [-1, 1], ``label`` and ``id`` (grid: ``"<file>:y<row>:x<col>"``), ``coords``
    (3,) = (B-scan index, y, x) and ``mask`` (1, S, S) where the scans have masks. Grid windows
    are scored one by one and aggregated into a B-scan score by the evaluation (``aggregate``:
    max, mean, the mean of the ``top_k`` highest, or ``map_retina``: the mean of the stitched
    map over the retina; :func:`anogan_lightning.evaluation.stitch.window_to_bscan`) and their
    maps stitched into one map per B-scan (:class:`anogan_lightning.evaluation.stitch.Stitcher`),
    set to 0 outside the retina by :meth:`restrict_maps` when ``map_region="retina"``. What the
    evaluation reads (``image_shapes``, ``window_counts``, :meth:`image`, :meth:`image_mask`,
    ...) is :class:`anogan_lightning.evaluation.protocol.WindowedBScans`.

    Every scan is normalised once by :meth:`preload` (threads; kept as uint8 bands, or read
    from ``cache_dir`` when the files and settings are unchanged). A scan that fails (unreadable,
    :class:`~anogan_lightning.data.preprocess.RetinaNotFoundError`, a mask of another size) is
    skipped with a warning naming the file and the reason, and counted in ``n_skipped``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        retina: pp.RetinaNorm,
        mode: str = "grid",
        masks: Sequence[Path | None] | None = None,
        stride: int | None = None,
        aggregate: str = "max",
        top_k: int = 3,
        cache_dir: str | Path | None = None,
        map_region: str = "retina",
    ) -> None:
        if mode not in ("random", "center", "grid"):
            raise ValueError(f"mode={mode!r}; expected random, center or grid")
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={aggregate!r}; expected one of {AGGREGATIONS}")
        if map_region not in MAP_REGIONS:
            raise ValueError(f"map_region={map_region!r}; expected one of {MAP_REGIONS}")
        if retina.height < image_size:
            raise ValueError(f"retina.height={retina.height} < image_size={image_size}")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.classes = list(classes)
        self.masks = list(masks) if masks is not None else [None] * len(self.paths)
        assert len(self.paths) == len(self.labels) == len(self.classes) == len(self.masks)
        self.image_size = image_size
        self.retina = retina
        self.mode = mode
        self.stride = stride or max(1, image_size // 2)
        self.aggregate = aggregate if mode == "grid" else None  # read by the evaluation
        self.top_k = top_k
        self.map_region = map_region
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.has_mask = any(m is not None for m in self.masks)
        self.n_skipped = 0
        self.failures: list[str] = []
        self._bands: np.ndarray | None = None  # (height, sum of widths) uint8
        self._masks: np.ndarray | None = None
        self._retina_rows = np.zeros((2, 0), dtype=np.float32)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._windows = np.zeros((0, 3), dtype=np.int64)  # grid: (image, y, x)

    # -- preprocessing, once ------------------------------------------------------------------
    def _prepare(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | str:
        path, mpath = self.paths[i], self.masks[i]
        try:
            a = read_gray(path)
            r = pp.normalize_bscan(a, self.retina, name=str(path))
            band = np.round((r.band + 1.0) * 127.5).astype(np.uint8)
            mask = r.apply(read_mask_image(mpath, a.shape)) if mpath is not None else None
            return band, mask, np.stack([r.ilm, r.bm]).astype(np.float32)
        except pp.RetinaNotFoundError as e:
            return str(e)
        except Exception as e:  # any decoder error: one bad file must not stop the run
            return f"{path}: unreadable ({type(e).__name__}: {e})"

    def _cache_key(self) -> str:
        sig = []
        for p, m in zip(self.paths, self.masks, strict=True):
            for f in (p, m):
                st = f.stat() if f is not None and f.exists() else None
                sig.append(None if st is None else [str(f.resolve()), st.st_size, st.st_mtime_ns])
        blob = json.dumps({"v": 2, "files": sig, "retina": self.retina.key()}, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:20]

    def preload(self, name: str = "", threads: int | None = None) -> None:
        """Normalise every scan once (or load the cached result); failures dropped (warned,
        counted). Builds the grid of windows for ``mode="grid"``."""
        cached = None
        if self.cache_dir is not None:
            cached = self.cache_dir / f"bscans-{self._cache_key()}.npz"
        if cached is not None and cached.is_file():
            z = np.load(cached, allow_pickle=False)
            keep, bands, offsets = z["keep"].tolist(), z["bands"], z["offsets"]
            masks = z["masks"] if "masks" in z.files else None
            retina_rows = z["retina_rows"]
            failures = [str(f) for f in z["failures"]]
            log.info("bscans %s: %d normalised scans from the cache %s", name, len(keep), cached)
        else:
            threads = threads or min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(threads) as pool:  # PIL and numpy release the GIL
                results = list(pool.map(self._prepare, range(len(self.paths))))
            keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
            failures = [r for r in results if isinstance(r, str)]
            kept = [results[i] for i in keep]
            h = self.retina.height
            bands = (
                np.concatenate([b for b, _, _ in kept], axis=1)
                if kept
                else np.zeros((h, 0), np.uint8)
            )
            retina_rows = (
                np.concatenate([r for _, _, r in kept], axis=1)
                if kept
                else np.zeros((2, 0), np.float32)
            )
            widths = [b.shape[1] for b, _, _ in kept]
            offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
            masks = None
            if self.has_mask and kept:
                masks = np.concatenate(
                    [m if m is not None else np.zeros_like(b) for b, m, _ in kept], axis=1
                )
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".tmp-{os.getpid()}.npz")
                extra = {"masks": masks} if masks is not None else {}
                np.savez(
                    tmp,
                    keep=np.array(keep, dtype=np.int64),
                    bands=bands,
                    offsets=offsets,
                    retina_rows=retina_rows,
                    failures=np.array(failures, dtype=str),
                    **extra,
                )
                tmp.replace(cached)
        for f in failures:
            warnings.warn(f"skipping B-scan {f}", stacklevel=2)
        self.failures = failures
        self.n_skipped = len(failures)
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        self.classes = [self.classes[i] for i in keep]
        self.masks = [self.masks[i] for i in keep]
        self._bands, self._masks, self._offsets = bands, masks, offsets
        self._retina_rows = retina_rows  # (2, sum of widths): ILM and BM rows in the band
        if self.mode == "grid":
            s, rows = self.image_size, []
            for i, (h, w) in enumerate(self.image_shapes):
                for y in window_starts(int(h), s, self.stride):
                    for x in window_starts(int(w), s, self.stride):
                        rows.append((i, y, x))
            self._windows = np.array(rows, dtype=np.int64).reshape(-1, 3)

    # -- the B-scans, for aggregation, stitching and figures ----------------------------------
    def _require(self) -> None:
        if self._bands is None:
            raise RuntimeError(
                "RetinaBScanDataset: call preload() first (the scans are normalised once)"
            )

    @property
    def image_ids(self) -> list[str]:
        return [str(p) for p in self.paths]

    @property
    def image_labels(self) -> torch.Tensor:
        return self.labels

    @property
    def window_counts(self) -> np.ndarray:
        """(n_images,) int64: grid windows per B-scan (``mode="grid"``; else zeros)."""
        self._require()
        return np.bincount(self._windows[:, 0], minlength=len(self.paths)).astype(np.int64)

    @property
    def image_shapes(self) -> np.ndarray:
        """(n_images, 2) rows and columns of each normalised band (widths >= image_size)."""
        self._require()
        w = np.maximum(np.diff(self._offsets), self.image_size)
        return np.stack([np.full(len(w), self.retina.height), w], axis=1).astype(np.int64)

    def _band(self, arr: np.ndarray, i: int) -> np.ndarray:
        a = arr[:, self._offsets[i] : self._offsets[i + 1]]
        return pad_width(a, self.image_size)  # narrow bands: padded (background) to one window

    def image(self, i: int) -> np.ndarray:
        """Normalised band of B-scan ``i``: (height, W') float32 in [-1, 1]."""
        self._require()
        return to_unit_range(self._band(self._bands, i))

    def image_retina(self, i: int) -> np.ndarray:
        """(height, W') bool of B-scan ``i``: True from its ILM to its BM row (band coordinates;
        False in the padding of a narrow band), the pixels of ``aggregate=map_retina``."""
        ilm, bm = self._boundaries(i)
        r = np.arange(self.retina.height, dtype=np.float32)[:, None]
        inside = (r >= np.floor(ilm)[None]) & (r <= np.ceil(bm)[None])
        return pad_width(inside, self.image_size, value=False)  # as _band pads the band

    def _boundaries(self, i: int) -> np.ndarray:
        """(2, W) ILM and BM rows of B-scan ``i`` in band coordinates (no padding)."""
        self._require()
        return self._retina_rows[:, self._offsets[i] : self._offsets[i + 1]]

    def thickness_scores(self, q: float = 75.0) -> torch.Tensor:
        """(n_images,) float64: the ``q``-th percentile of each B-scan's retinal thickness
        (BM row minus ILM row, per column of its band) over its median, minus 1, the
        ``thickness`` reference score beside every method's (``<split>/auroc_thickness``).

        Not learned and not fitted: fluid and drusenoid elevations thicken a part of the
        retina, which raises the upper quartile of the profile against its median, while the
        ratio is free of the device's axial pixel size and of the band's resampling. It tells
        a reader how much of a detector's B-scan AUROC an anatomy measurement alone gives.
        ``q`` = 75 was chosen over 90, 95, 100 and the coefficient of variation by the mean
        AUROC over kermany's validation split and duke-dme-fluid subjects 1-2
        (experiments/README.md); a scan of thickness 0 everywhere (never kept by the
        normalisation) would give NaN."""
        self._require()
        out = torch.empty(len(self._offsets) - 1, dtype=torch.float64)
        for i in range(len(out)):
            ilm, bm = self._boundaries(i)
            t = (bm - ilm).astype(np.float64)
            med = float(np.median(t))
            out[i] = float(np.percentile(t, q)) / med - 1.0 if med > 0 else float("nan")
        return out

    def restrict_maps(self, maps: np.ndarray) -> np.ndarray:
        """Stitched maps (n, H, W) of this dataset's B-scans (:class:`Stitcher` layout), with
        ``map_region="retina"`` set outside each B-scan's retina (:meth:`image_retina`) to 0,
        "nothing anomalous" for the maps of this package (all >= 0; a map with negative values
        gets its own minimum there instead), NaN kept; a copy. ``"band"``: unchanged."""
        if self.map_region == "band":
            return maps
        out = np.array(maps, copy=True)
        for i in range(len(out)):
            inside = self.image_retina(i)
            h, w = inside.shape
            m = out[i, :h, :w]
            outside = ~inside & np.isfinite(m)
            if outside.any():
                m[outside] = min(0.0, float(np.nanmin(m)))
        return out

    def image_mask(self, i: int) -> np.ndarray | None:
        """(height, W') uint8 lesion mask of B-scan ``i`` in band coordinates, or None."""
        if self._masks is None or self.masks[i] is None:
            return None
        return self._band(self._masks, i)

    # -- items --------------------------------------------------------------------------------
    def __len__(self) -> int:
        self._require()
        return len(self._windows) if self.mode == "grid" else len(self.paths)

    def __getitem__(self, k: int) -> dict:
        self._require()
        s = self.image_size
        if self.mode == "grid":
            i, y, x = (int(v) for v in self._windows[k])
        else:
            i = k
            h, w = (int(v) for v in self.image_shapes[i])
            if self.mode == "random":
                y = int(torch.randint(h - s + 1, ()))
                x = int(torch.randint(w - s + 1, ()))
            else:
                y, x = (h - s) // 2, (w - s) // 2
        band = self._band(self._bands, i)
        item = {
            "x": torch.from_numpy(to_unit_range(band[y : y + s, x : x + s]))[None],
            "label": int(self.labels[i]),
            "id": f"{self.paths[i]}:y{y}:x{x}" if self.mode == "grid" else str(self.paths[i]),
            "coords": torch.tensor([i, y, x], dtype=torch.long),
            "cls": self.classes[i],  # its B-scan's class folder, for per-class metrics
        }
        if self.has_mask:
            m = (
                self._band(self._masks, i)[y : y + s, x : x + s]
                if self._masks is not None
                else None
            )
            item["mask"] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None]
        return item


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
        fill_white: bool = FILL_WHITE,
        retina: dict | None = None,
        window_stride: int | None = None,
        aggregate: str = "max",
        top_k: int = 3,
        map_region: str = "retina",
        cache_dir: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, num_workers, pin_memory)
        for arg, value, allowed in (
            ("val_from", val_from, self.VAL_FROM),
            ("resize", resize, ("retina", "crop", "squash")),
            ("train_crop", train_crop, ("random", "center")),
            ("aggregate", aggregate, AGGREGATIONS),
            ("map_region", map_region, MAP_REGIONS),
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
        self.retina = retina_norm(retina, fill_white)
        if resize == "retina" and not preload:
            raise ValueError("resize='retina' normalises every scan once: it needs preload=true")
        self.window_stride = window_stride
        self.aggregate = aggregate
        self.top_k = top_k
        self.map_region = map_region
        self.cache_dir = cache_dir
        self.seed = seed

    VAL_FROM: tuple[str, ...] = ("train", "val")

    @property
    def n_skipped(self) -> int:
        """Unreadable images skipped so far (in this process)."""
        sets = (self.train_set, self.val_set, self.test_set)
        return sum(ds.n_skipped for ds in sets if ds is not None)

    def _dataset(
        self, items: list[tuple[Path, str]], crop: str, masks: list[Path | None] | None = None
    ) -> KermanyDataset | RetinaBScanDataset:
        """``crop``: "random"/"center" for training, "grid" for val/test (every window with
        ``resize="retina"``, the centre crop otherwise)."""
        paths = [p for p, _ in items]
        classes = [c for _, c in items]
        labels = [0 if _is_normal(c) else 1 for c in classes]
        if self.resize == "retina":
            return RetinaBScanDataset(
                paths,
                labels,
                classes,
                self.image_size,
                self.retina,
                crop,
                masks,
                self.window_stride,
                self.aggregate,
                self.top_k,
                self.cache_dir,
                self.map_region,
            )
        crop = "center" if crop == "grid" else crop
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

    def _check_layout(self) -> None:
        self._split_dir("test")

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
        self.val_set = self._dataset(val, "grid")

    def _setup_test(self) -> None:
        items = [(p, c) for c, ps in list_split(self._split_dir("test")).items() for p in ps]
        self.test_set = self._dataset(items, "grid")

    def setup(self, stage: str | None = None) -> None:
        """Index the splits ``stage`` needs (fit/validate: train+val; test/predict: test)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist (set data.root)")
        t0 = time.perf_counter()
        fit = stage in (None, "fit", "validate")
        test = stage in (None, "test", "predict")
        if stage == "fit":
            self._check_layout()  # fail now rather than after training
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
            windows = f", {len(ds)} windows" if getattr(ds, "aggregate", None) else ""
            log.info(
                "kermany %s: %d images%s %s",
                name,
                len(ds.classes),
                windows,
                dict(sorted(counts.items())),
            )
        if self.n_skipped:
            log.warning("kermany: skipped %d unreadable or failed image(s)", self.n_skipped)
        log.info("kermany setup(%s) took %.1f s", stage, time.perf_counter() - t0)
