"""Reading B-scan files: the one list of image suffixes, folder listing, decoders, and the
threaded read-once that the datasets' ``preload`` share.

Listing follows symbolic links to folders and files (a dataset assembled from links to class
folders elsewhere is listed as if copied); a link back to a folder being walked (a loop) is
skipped.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from anogan_lightning.data.retina.normalize import flatten_bscan
from anogan_lightning.data.retina.segment import fill_mask
from anogan_lightning.data.transforms import fit_height, pad_width, squash

log = logging.getLogger(__name__)

#: B-scan image files (any case); a mask of a scan may have any of them too
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")

T = TypeVar("T")


def walk_files(folder: str | Path) -> list[Path]:
    """Every file under ``folder`` (recursively, sorted), following symbolic links to folders
    and files; a folder whose resolved path is one of the folders above it (a link loop) is
    not entered again. Paths are as reached from ``folder`` (links not resolved)."""
    out: list[Path] = []

    def walk(d: Path, above: frozenset[str]) -> None:
        real = os.path.realpath(d)
        if real in above:
            log.warning("skipping %s: a link back to %s (a loop)", d, real)
            return
        above = above | {real}
        with os.scandir(d) as entries:
            for e in entries:
                p = d / e.name
                if e.is_dir():  # follows links
                    walk(p, above)
                elif e.is_file():  # follows links; a broken link is neither
                    out.append(p)

    walk(Path(folder), frozenset())
    return sorted(out)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path) -> list[Path]:
    """B-scan image files under ``folder``: :func:`walk_files` filtered by IMAGE_SUFFIXES."""
    return [p for p in walk_files(folder) if is_image(p)]


def read_listing(table: Path, columns: Sequence[str | None], what: str) -> list[dict]:
    """The rows of a CSV listing scans (``what`` names it in errors, e.g. "B-scan list ...
    (data.csv)"): FileNotFoundError if it does not exist, ValueError naming a column of
    ``columns`` (None: not used) that its header lacks."""
    if not table.is_file():
        raise FileNotFoundError(what.format(table=table))
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0]) if rows else []
    for col in columns:
        if col is not None and col not in header:
            raise ValueError(f"{table}: no column {col!r} (columns: {', '.join(header)})")
    return rows


def check_listed(table: Path, missing: list[str]) -> None:
    """FileNotFoundError naming the first five of the ``missing`` files a listing names."""
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{table} lists missing files: {'; '.join(missing[:5])}{more}")


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


def read_image(
    path: str | Path, image_size: int, resize: str, flatten: bool, fill_white: bool
) -> np.ndarray:
    """uint8 grayscale: a strip (S, W >= S) for ``resize="crop"``, (S, S) for ``"squash"``.

    ``fill_white``: the near-white wedges that registration leaves at the top or bottom of a
    rotated scan are set to the scan's dark background (10th percentile of its other pixels).
    ``flatten``: every column is shifted so the detected Bruch's membrane is a straight row
    (:func:`anogan_lightning.data.retina.normalize.flatten_bscan`). Both work on the scan
    decoded at no less than twice the output height, before the resize. ``resize="retina"`` has
    no strip of this kind (its scans are bands of windows):
    :class:`~anogan_lightning.data.bscan.retina_windows.RetinaBScanDataset` reads those.
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
    column, :func:`anogan_lightning.data.retina.segment.fill_mask`) set to the dark
    background."""
    valid = fill_mask(a)
    if valid.all() or not valid.any():
        return a
    out = a.copy()
    out[~valid] = np.uint8(np.percentile(a[valid], 10))
    return out


# ------------------------------------------------------------------------------ read once


def read_all(
    read: Callable[[int], T], n: int, name: str = "", threads: int | None = None
) -> list[T]:
    """``[read(i) for i in range(n)]`` on a thread pool (PIL decodes and numpy computes without
    the GIL), in order; a progress line per tenth for large sets."""
    threads = threads or min(8, os.cpu_count() or 1)
    every = max(2000, n // 10)
    out: list[T] = []
    with ThreadPoolExecutor(threads) as pool:
        for i, r in enumerate(pool.map(read, range(n)), 1):
            out.append(r)
            if i % every == 0:
                log.info("bscans %s: read %d/%d", name, i, n)
    return out


def concat_columns(arrays: Sequence[np.ndarray], rows: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Arrays (rows, W_i) side by side: (rows, sum W_i) and the (n + 1,) column offsets, so that
    array i is ``out[:, offsets[i]:offsets[i + 1]]`` (one allocation for a whole split)."""
    widths = [a.shape[1] for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
    out = np.concatenate(arrays, axis=1) if arrays else np.zeros((rows, 0), dtype)
    return out, offsets
