"""Retina-normalised B-scans scored whole, as windows (``resize="retina"``).

Each B-scan is normalised on its retina once
(:func:`anogan_lightning.data.retina.normalize.normalize_bscan`: ILM/BM, flattening, a band
resampled to ``retina.height`` rows and a fixed column size) and kept as a uint8 band; training
draws ``image_size`` windows from the bands, val/test score every window of a grid and
aggregate them into the B-scan's score. The normalised bands are cached on disk
(``cache_dir``) under a key of the files, the settings and
:data:`~anogan_lightning.data.cache_files.CACHE_VERSION`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from anogan_lightning.data.bscan.io import concat_columns, read_all, read_gray, read_mask_image
from anogan_lightning.data.bscan.windows import window_starts
from anogan_lightning.data.cache_files import CACHE_VERSION, digest, file_signature
from anogan_lightning.data.retina.normalize import NormalizedBScan, normalize_bscan
from anogan_lightning.data.retina.segment import RetinaNotFoundError
from anogan_lightning.data.transforms import pad_width, to_unit_range

if TYPE_CHECKING:
    from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing

log = logging.getLogger(__name__)

MODES = ("random", "center", "grid")


class RetinaBScanDataset(Dataset):
    """Retina-normalised B-scans
    (:func:`~anogan_lightning.data.retina.normalize.normalize_bscan`) as ``image_size`` windows;
    built by :meth:`BScanPreprocessing.train_dataset` / ``eval_dataset``, whose ``image_size``,
    ``retina``, ``window_stride`` (``stride``), ``aggregate``, ``top_k`` and ``map_region`` it
    takes.

    ``mode``: ``"random"`` (training: one window per B-scan and item, anywhere in the band,
    position from torch's RNG), ``"center"`` (the centre window) or ``"grid"`` (val/test: every
    window, ``stride`` apart and flush with the band's edges, one item each). Items: ``x``
    (1, S, S) in [-1, 1], ``label`` and ``id`` (grid: ``"<file>:y<row>:x<col>"``), ``coords``
    (3,) = (B-scan index, y, x) and ``mask`` (1, S, S) where the scans have masks. Grid windows
    are scored one by one and aggregated into a B-scan score by the method's base class
    (``aggregate``: max, mean, the mean of the ``top_k`` highest, or ``map_retina``: the mean
    of the stitched map over the retina, :func:`anogan_lightning.evaluation.stitch.retina_map_scores`)
    and their maps stitched into one map per B-scan
    (:class:`anogan_lightning.evaluation.stitch.Stitcher`, through ``image_shapes``, ``image_ids``,
    :meth:`image`, :meth:`image_mask`), set to 0 outside the retina by :meth:`restrict_maps`
    when ``map_region="retina"``.

    Every scan is normalised once by :meth:`preload` (threads; kept as uint8 bands, or read
    from ``cache_dir`` when the files and settings are unchanged). A scan that fails (unreadable,
    :class:`~anogan_lightning.data.retina.segment.RetinaNotFoundError`, a mask of another size) is
    skipped with a warning naming the file and the reason, and counted in ``n_skipped``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        preprocessing: BScanPreprocessing,
        mode: str,
        masks: Sequence[Path | None] | None,
        cache_dir: str | Path | None,
        images: Sequence[np.ndarray] | None = None,
        boundaries: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
        keep_geometry: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if images is not None and (cache_dir is not None or len(images) != len(paths)):
            raise ValueError("in-memory B-scans: one name (path) per image and no cache_dir")
        pre = preprocessing  # validated there: resize, retina.height >= image_size, aggregate, ...
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.classes = list(classes)
        self.masks = list(masks) if masks is not None else [None] * len(self.paths)
        assert len(self.paths) == len(self.labels) == len(self.classes) == len(self.masks)
        self.image_size = pre.image_size
        self.retina = pre.retina
        self.mode = mode
        self.stride = pre.window_stride or max(1, pre.image_size // 2)
        self.aggregate = pre.aggregate if mode == "grid" else None  # read by AnomalyModule
        self.top_k = pre.top_k
        self.map_region = pre.map_region
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.images = list(images) if images is not None else None  # B-scans held in memory
        self.boundaries = list(boundaries) if boundaries is not None else [None] * len(self.paths)
        self.keep_geometry = keep_geometry
        self._geometry: dict[int, NormalizedBScan] = {}  # keep_geometry: by input index
        self.has_mask = any(m is not None for m in self.masks)
        self.n_skipped = 0
        self.failures: list[str] = []
        self._bands: np.ndarray | None = None  # (height, sum of widths) uint8
        self._masks: np.ndarray | None = None
        self._retina_rows = np.zeros((2, 0), dtype=np.float32)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._windows = np.zeros((0, 3), dtype=np.int64)  # grid: (image, y, x)

    # -- preprocessing, once ------------------------------------------------------------------
    def _scan(self, i: int) -> np.ndarray:
        return self.images[i] if self.images is not None else read_gray(self.paths[i])

    def geometry(self, i: int) -> NormalizedBScan:
        """B-scan ``i`` normalised again, with the geometry of its band (shifts, crop and
        resample weights: :meth:`NormalizedBScan.to_scan` carries its stitched map back onto
        the scan). Deterministic, so the same band as :meth:`preload`'s; costs one
        normalisation (the bands are kept as uint8 without their geometry) unless the
        dataset was built with ``keep_geometry=True`` (and not read from the cache)."""
        self._require()
        if i in self._geometry:
            return self._geometry[i]
        return normalize_bscan(
            self._scan(i), self.retina, name=str(self.paths[i]), boundaries=self.boundaries[i]
        )

    def scan_map(
        self, i: int, stitched: np.ndarray, geometry: NormalizedBScan | None = None
    ) -> np.ndarray:
        """B-scan ``i``'s stitched map (a :class:`Stitcher` map: its band at the top left,
        possibly padded) on the scan's own pixel grid (H, W), NaN outside the band
        (:meth:`NormalizedBScan.to_scan`; ``geometry``: :meth:`geometry`'s, when at hand)."""
        h, w = (int(v) for v in self.image_shapes[i])
        g = geometry if geometry is not None else self.geometry(i)
        return g.to_scan(np.asarray(stitched)[:h, :w])

    def scan_mask(self, i: int) -> np.ndarray | None:
        """(H, W) uint8 lesion mask of B-scan ``i`` on the scan's own pixel grid, or None."""
        if self.masks[i] is None:
            return None
        shape = self._scan(i).shape
        return (read_mask_image(self.masks[i], shape) != 0).astype(np.uint8)

    def _prepare(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | str:
        path, mpath = self.paths[i], self.masks[i]
        try:
            a = self._scan(i)
            r = normalize_bscan(a, self.retina, name=str(path), boundaries=self.boundaries[i])
            if self.keep_geometry:
                self._geometry[i] = r
            band = np.round((r.band + 1.0) * 127.5).astype(np.uint8)
            mask = r.apply(read_mask_image(mpath, a.shape)) if mpath is not None else None
            return band, mask, np.stack([r.ilm, r.bm]).astype(np.float32)
        except RetinaNotFoundError as e:
            return str(e)
        except Exception as e:  # any decoder error: one bad file must not stop the run
            return f"{path}: unreadable ({type(e).__name__}: {e})"

    def _cache_key(self) -> str:
        files = [
            [file_signature(f) if f is not None and f.exists() else None for f in (p, m)]
            for p, m in zip(self.paths, self.masks, strict=True)
        ]
        return digest(
            {
                "kind": "bscans",
                "version": CACHE_VERSION,
                "files": files,
                "retina": self.retina.key(),
            }
        )

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
            results = read_all(self._prepare, len(self.paths), name, threads)
            keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
            failures = [r for r in results if isinstance(r, str)]
            kept = [results[i] for i in keep]
            bands, offsets = concat_columns([b for b, _, _ in kept], self.retina.height, np.uint8)
            retina_rows, _ = concat_columns([r for _, _, r in kept], 2, np.float32)
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
        self._geometry = {j: self._geometry[i] for j, i in enumerate(keep) if i in self._geometry}
        if self.images is not None:
            self.images = [self.images[i] for i in keep]
        self.boundaries = [self.boundaries[i] for i in keep]
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
        (experiments/notes/2026-12-03-thickness-reference.md); a scan of thickness 0
        everywhere (never kept by the normalisation) would give NaN."""
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
