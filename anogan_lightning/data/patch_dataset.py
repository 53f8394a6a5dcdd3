"""The memory-mapped patches of one split (a :mod:`~anogan_lightning.data.patch_cache` entry)
as a Dataset, and the B-scans they came from (for stitching maps and figures).

A batch is one gather from the memmap (``ds[indices]``, indices from
:class:`~anogan_lightning.data.patch_sampler.PatchBatchSampler`), not ``batch_size``
``__getitem__`` calls and a collate. Batches follow the package contract (``x``, ``label``,
``id`` = ``"<volume file>:b<B-scan>:y<row>:x<col>"``, ``mask``) plus ``coords`` (B, 3) int64
for stitching patch anomaly maps back into B-scans (:mod:`anogan_lightning.evaluation.stitch`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """Memory-mapped patches of one split.

    ``ds[i]``: one item ``{"x": (1, S, S), "label", "id", "coords": (3,), "mask"?}``;
    ``ds[indices]`` (a sequence/array of ints, e.g. from :class:`PatchBatchSampler`): the whole
    batch at once, ``x`` (B, 1, S, S) float32 in [-1, 1], ``label`` (B,) int64, ``id`` list,
    ``coords`` (B, 3) int64 (B-scan index in the split, y, x), ``mask`` (B, 1, S, S) float32.

    Also the layout for stitching: ``image_ids`` ("<volume file>:b<B-scan>"), ``image_shapes``
    (n_images, 2), :meth:`image` and :meth:`image_mask` (the flattened band and its mask).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.size = int(meta["size"])
        self.has_mask = bool(meta["has_mask"])
        self.volumes: list[dict] = meta["volumes"]
        self.images: list[list[int]] = meta["images"]
        self.labels = torch.from_numpy(np.load(self.folder / "labels.npy"))
        self.coords = np.load(self.folder / "coords.npy")
        self._x: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._bands: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps (no data pickled)
        state = self.__dict__.copy()
        state.update(_x=None, _mask=None, _bands={})
        return state

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._x is None:
            self._x = np.load(self.folder / "x.npy", mmap_mode="r")
            if self.has_mask:
                self._mask = np.load(self.folder / "mask.npy", mmap_mode="r")
        return self._x, self._mask

    def __len__(self) -> int:
        return len(self.labels)

    def patch_id(self, i: int) -> str:
        image, y, x = (int(v) for v in self.coords[i])
        v, b = self.images[image]
        return f"{self.volumes[v]['path']}:b{b}:y{y}:x{x}"

    def __getitem__(self, index) -> dict:
        if isinstance(index, int | np.integer):
            batch = self._batch(np.array([int(index)]))
            return {k: (v[0] if k != "label" else int(v[0])) for k, v in batch.items()}
        return self._batch(np.asarray(index, dtype=np.int64))

    def _batch(self, idx: np.ndarray) -> dict:
        x_arr, m_arr = self._arrays()
        # one gather from the memmap; the float conversion in numpy, single-threaded: torch's
        # intra-op threads cost more than they save on a small batch, and a lot on a busy CPU
        x = x_arr[idx][:, None].astype(np.float32)
        x /= np.float32(127.5)  # exactly to_unit_range: 0 -> -1, 255 -> 1
        x -= np.float32(1.0)
        out = {
            "x": torch.from_numpy(x),
            "label": self.labels[idx],
            "id": [self.patch_id(i) for i in idx],
            "coords": torch.from_numpy(self.coords[idx].astype(np.int64)),
        }
        if m_arr is not None:
            out["mask"] = torch.from_numpy(m_arr[idx][:, None].astype(np.float32))
        return out

    # -- the B-scans the patches came from, for stitching and figures --------------------------
    @property
    def image_ids(self) -> list[str]:
        return [f"{self.volumes[v]['path']}:b{b}" for v, b in self.images]

    @property
    def image_shapes(self) -> np.ndarray:
        """(n_images, 2) rows and columns of each flattened band."""
        shapes = [self.volumes[v]["band_shape"][1:] for v, _ in self.images]
        return np.array(shapes, dtype=np.int64).reshape(-1, 2)

    def _volume_array(self, v: int, name: str) -> np.ndarray | None:
        path = Path(self.volumes[v]["dir"]) / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def image(self, i: int) -> np.ndarray:
        """Flattened band of B-scan ``i``: (H, W) float32 in [-1, 1]."""
        v, b = self.images[i]
        return np.asarray(self._volume_array(v, "band")[b], dtype=np.float32) / 127.5 - 1.0

    def image_mask(self, i: int) -> np.ndarray | None:
        """(H, W) uint8 lesion mask of B-scan ``i`` in band coordinates, or None."""
        v, b = self.images[i]
        m = self._volume_array(v, "mask")
        return None if m is None else np.asarray(m[b])
