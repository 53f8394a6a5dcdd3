"""SD-OCT volumes as 2-D patches (AnoGAN, Schlegl et al., IPMI 2017, sec. 3): ``data=oct_volume``.

Folder layout (``root``)::

    train/<name>.<ext>            healthy volumes (training patches)
    test/<name>.<ext>             held-out volumes, healthy and diseased
    test/masks/<name>.<mext>      optional voxel annotation per volume (same shape; non-zero = lesion)
    test/labels.csv               optional "file,label" rows (0 healthy, 1 diseased)
    val/...                       optional, laid out like test/

``<ext>``: .vol, .e2e, .npy, .npz, .tif/.tiff, .nii/.nii.gz; ``<mext>`` the same minus
.vol/.e2e (:mod:`anogan_lightning.data.readers`). With ``root=None`` the built-in synthetic
volumes (:mod:`anogan_lightning.data.synthetic_volume`) are written as .npz files under
``<cache_dir>/synthetic-<hash>`` and read through the same path.

Preprocessing per volume (:mod:`anogan_lightning.data.preprocess`): intensities to [-1, 1],
columns resampled to ``target_spacing_x_um`` (22 µm as in the paper; ``null`` keeps them),
ILM/BM detection, flattening on BM and a band of ``crop_height`` rows with BM ``below_bm`` rows
above its bottom. Patches of ``image_size``:

- train: ``train_patches_per_bscan`` random positions per B-scan of every healthy volume, the
  patch centre between ILM and BM (the paper: 1,000,000 patches from 270 volumes, ~75 per
  B-scan). Positions are drawn once per cache (seeded by ``seed`` and the volume's key), so the
  training set is fixed like the paper's; raise the count for more variety.
- val/test: a grid with stride ``grid_stride`` (default ``image_size``: every pixel scored once)
  over the band, keeping patches that touch the retina. Label 1 when any mask pixel of the
  volume lies inside the patch (the paper's protocol). A volume without a mask takes its row of
  ``labels.csv`` for every patch (image-level only: it then has no pixel masks); a volume with
  neither is an error naming it. ``mask`` is in the batches of a split when every volume of it
  has a mask.
- val: ``<root>/val`` when it exists, otherwise ``val_volumes`` volumes held out of ``test/``
  (seeded, alternating diseased and healthy so that both classes are there when possible).

Cache (``cache_dir``; the config's default is ``${paths.log_dir}/cache/oct_volume``, i.e.
``outputs/cache/oct_volume`` beside the runs, because a data root is often read-only):

- ``volumes/<key>/``: ``band.npy`` (n, crop_height, W) uint8 (the [-1, 1] band quantised to
  256 levels, x = q / 127.5 - 1, like 8-bit OCT exports), ``ilm.npy``/``bm.npy`` (n, W) rows in
  the band, ``mask.npy`` when annotated, ``meta.json``. The key hashes the volume's and mask's
  (resolved path, size, mtime) and every preprocessing setting: a changed file or setting gives
  a new key (rebuilt), the same ones are a hit (no segmentation).
- ``patches/<key>/``: ``x.npy`` (N, S, S) uint8 patches, ``labels.npy``, ``coords.npy`` (N, 3):
  (B-scan index in the split, y, x), ``mask.npy`` when masked, ``meta.json``; keyed by the
  volume keys and the patch settings.

Both are written to a temporary folder and renamed into place (concurrent runs cannot see a half
cache), volume by volume (never all volumes in memory), and read back memory-mapped. Stale
entries are not deleted; remove the folder to reclaim space.

Loading: a batch is one sorted block of indices read from the memmap at once
(:class:`PatchBatchSampler`, ``batch_size=None`` in the DataLoader), not ``batch_size``
``__getitem__`` calls and a collate. Batches follow the package contract (``x``, ``label``,
``id`` = ``"<volume file>:b<B-scan>:y<row>:x<col>"``, ``mask``) plus ``coords`` (B, 3) int64
for stitching patch anomaly maps back into B-scans (:mod:`anogan_lightning.pixel_eval`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from anogan_lightning.data import preprocess as pp
from anogan_lightning.data.base import AnomalyDataModule
from anogan_lightning.data.readers import (
    MASK_SUFFIXES,
    is_volume_file,
    read_mask,
    read_volume,
    resolve_spacing_x,
    stem,
)
from anogan_lightning.data.synthetic_volume import write_synthetic_volumes

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when preprocessing changes what a cached volume holds
REFERENCE_SPACING_X_UM = 11.5  # column spacing of the BoundaryParams reference B-scan


# ------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class VolumeSource:
    """A volume file, its optional mask file and optional volume label (labels.csv)."""

    path: Path
    mask: Path | None = None
    label: int | None = None


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_signature(path: Path | None) -> dict | None:
    """What identifies a file's content for the cache: resolved path, size, mtime (ns)."""
    if path is None:
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_labels(folder: Path) -> dict[str, int]:
    path = folder / "labels.csv"
    if not path.is_file():
        return {}
    out = {}
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or row[0].strip().startswith("#"):
                continue
            if i == 0 and row[0].strip().lower() in ("file", "volume", "name"):
                continue  # header
            if len(row) < 2 or row[1].strip() not in ("0", "1"):
                raise ValueError(f"{path}: row {i + 1} {row} is not 'file,label' with label 0/1")
            out[row[0].strip()] = int(row[1])
    return out


def list_sources(folder: Path, need_labels: bool) -> list[VolumeSource]:
    """Volumes of one folder with their masks (``masks/<stem>.*``) and labels.csv entries.

    ``need_labels``: every volume needs a mask or a label (val/test); raises ValueError naming
    the first that has neither.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"OCT volume folder {folder} does not exist")
    labels = _read_labels(folder)
    masks: dict[str, Path] = {}
    if (folder / "masks").is_dir():
        for p in sorted((folder / "masks").iterdir()):
            if p.is_file() and any(p.name.lower().endswith(s) for s in MASK_SUFFIXES):
                masks.setdefault(stem(p), p)
    out = []
    for p in sorted(folder.iterdir()):
        if not is_volume_file(p):
            continue
        label = labels.get(p.name, labels.get(stem(p)))
        src = VolumeSource(p, masks.get(stem(p)), label)
        if need_labels and src.mask is None and src.label is None:
            raise ValueError(
                f"{p}: no mask ({folder / 'masks' / stem(p)}.npy/.npz/.tif/.nii.gz) and no row in "
                f"{folder / 'labels.csv'}; test volumes need one of them for their labels"
            )
        out.append(src)
    if not out:
        raise ValueError(f"{folder} holds no OCT volumes (.vol .e2e .npy .npz .tif .nii[.gz])")
    return out


# ------------------------------------------------------------------------------ volumes


@dataclass(frozen=True)
class PrepSettings:
    """Every setting that changes a prepared volume (all of it goes into the cache key)."""

    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    spacing_x_um: float | None = None  # used when the file carries none
    target_spacing_x_um: float | None = 22.0
    flatten: bool = True
    crop_height: int = 64
    below_bm: int = 8

    def key(self) -> dict:
        return {**self.__dict__, "intensity_percentiles": list(self.intensity_percentiles)}


def prepare_volume(src: VolumeSource, s: PrepSettings) -> dict[str, np.ndarray | dict]:
    """Read, normalise, resample, segment, flatten and crop one volume.

    Returns ``band`` (n, crop_height, W) uint8, ``ilm``/``bm`` (n, W) int16 rows in the band,
    ``mask`` (n, crop_height, W) uint8 or absent, and ``meta`` (shapes, spacing, label, counts).
    """
    vol = read_volume(src.path)
    n, h, w = vol.data.shape
    x = pp.normalize_intensity(vol.data, s.intensity_percentiles)
    mask = read_mask(src.mask, vol.data.shape) if src.mask is not None else None
    spacing_x = None
    if s.target_spacing_x_um is not None:
        spacing_x = resolve_spacing_x(vol, s.spacing_x_um)
        x = pp.resample_x(x, spacing_x, s.target_spacing_x_um)
        if mask is not None:
            mask = pp.resample_mask_x(mask, x.shape[-1])
    col_um = s.target_spacing_x_um or vol.spacing[2] or s.spacing_x_um or REFERENCE_SPACING_X_UM
    params = pp.BoundaryParams().scaled(rows=h / 496, cols=REFERENCE_SPACING_X_UM / col_um)
    ilm, bm = pp.detect_boundaries(x, params)
    band, ilm_b, bm_b, shifts = pp.flatten_crop(x, ilm, bm, s.crop_height, s.below_bm, s.flatten)
    out: dict = {
        "band": np.round((band + 1.0) * 127.5).astype(np.uint8),
        "ilm": np.clip(ilm_b, -32768, 32767).astype(np.int16),
        "bm": bm_b.astype(np.int16),
    }
    lesion_voxels = kept_voxels = 0
    if mask is not None:
        out["mask"] = pp.shift_columns(mask, shifts, s.crop_height)
        lesion_voxels, kept_voxels = int(mask.sum()), int(out["mask"].sum())
    label = src.label if src.label is not None else int(lesion_voxels > 0)
    out["meta"] = {
        "path": str(src.path),
        "shape": [n, h, w],
        "band_shape": list(band.shape),
        "spacing_um": list(vol.spacing),
        "spacing_x_um_used": spacing_x,
        "label": label,
        "lesion_voxels": lesion_voxels,
        "lesion_voxels_in_band": kept_voxels,
    }
    return out


def _write_atomic(final: Path, write) -> None:
    """``write(tmp_dir)`` then rename to ``final``; a concurrent writer that won keeps its copy."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_volume(src: VolumeSource, s: PrepSettings, cache_dir: Path) -> tuple[Path, bool]:
    """The prepared volume's cache folder, built if missing; (folder, built now)."""
    key = _digest(
        {
            "version": CACHE_VERSION,
            "volume": file_signature(src.path),
            "mask": file_signature(src.mask),
            "label": src.label,
            "settings": s.key(),
        }
    )
    final = cache_dir / "volumes" / key
    if (final / "meta.json").is_file():
        return final, False
    prepared = prepare_volume(src, s)

    def write(tmp: Path) -> None:
        for name, a in prepared.items():
            if name != "meta":
                np.save(tmp / f"{name}.npy", a)
        (tmp / "meta.json").write_text(json.dumps(prepared["meta"], indent=1))

    final.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(final, write)
    return final, True


# ------------------------------------------------------------------------------ patches


def _volume_rng(seed: int, volume_dir: Path) -> np.random.Generator:
    return np.random.default_rng([seed, int(volume_dir.name[:12], 16)])


def _positions(
    ilm: np.ndarray,
    bm: np.ndarray,
    height: int,
    size: int,
    mode: str,
    count: int,
    stride: int,
    rng: np.random.Generator | None,
) -> list[np.ndarray]:
    if mode == "random":
        return [
            pp.random_patch_positions(ilm[b], bm[b], height, size, count, rng)
            for b in range(len(ilm))
        ]
    return [pp.grid_patch_positions(ilm[b], bm[b], height, size, stride) for b in range(len(ilm))]


def build_patch_cache(
    volume_dirs: list[Path],
    cache_dir: Path,
    size: int,
    mode: str,
    count: int = 0,
    stride: int = 0,
    seed: int = 0,
) -> tuple[Path, bool]:
    """Patches of prepared volumes, streamed volume by volume into memmapped arrays.

    ``mode``: "random" (``count`` per B-scan, unlabelled: 0) or "grid" (``stride``, labels from
    masks or the volume label). Returns (folder, built now).
    """
    key = _digest(
        {
            "version": CACHE_VERSION,
            "volumes": [d.name for d in volume_dirs],
            "size": size,
            "mode": mode,
            "count": count if mode == "random" else None,
            "stride": stride if mode == "grid" else None,
            "seed": seed if mode == "random" else None,
        }
    )
    final = cache_dir / "patches" / key
    if (final / "meta.json").is_file():
        return final, False

    metas = [json.loads((d / "meta.json").read_text()) for d in volume_dirs]
    has_mask = mode == "grid" and all((d / "mask.npy").is_file() for d in volume_dirs)
    plans, total = [], 0  # pass 1: positions from the boundaries only (small arrays)
    for d in volume_dirs:
        ilm, bm = np.load(d / "ilm.npy"), np.load(d / "bm.npy")
        height = int(np.load(d / "band.npy", mmap_mode="r").shape[1])
        rng = _volume_rng(seed, d) if mode == "random" else None
        pos = _positions(ilm, bm, height, size, mode, count, stride, rng)
        plans.append(pos)
        total += sum(len(p) for p in pos)

    def write(tmp: Path) -> None:
        x = np.lib.format.open_memmap(tmp / "x.npy", "w+", np.uint8, (total, size, size))
        m = None
        if has_mask:
            m = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.uint8, (total, size, size))
        labels = np.zeros(total, dtype=np.int64)
        coords = np.zeros((total, 3), dtype=np.int32)
        images, volumes, i, image = [], [], 0, 0
        for v, (d, meta, pos) in enumerate(zip(volume_dirs, metas, plans, strict=True)):
            band = np.load(d / "band.npy", mmap_mode="r")
            mask = np.load(d / "mask.npy", mmap_mode="r") if (d / "mask.npy").is_file() else None
            volumes.append(
                {
                    "path": meta["path"],
                    "dir": str(d),
                    "label": meta["label"],
                    "band_shape": meta["band_shape"],
                }
            )
            for b, p in enumerate(pos):
                j = i + len(p)
                x[i:j] = pp.extract_patches(np.asarray(band[b]), p, size)
                if mode == "grid":
                    if mask is not None:
                        mb = np.asarray(mask[b])
                        labels[i:j] = pp.patch_labels(mb, p, size)
                        if m is not None:
                            m[i:j] = pp.extract_patches(mb, p, size)
                    else:
                        labels[i:j] = meta["label"]
                coords[i:j, 0] = image
                coords[i:j, 1:] = p
                images.append([v, b])
                image += 1
                i = j
        x.flush()
        if m is not None:
            m.flush()
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "coords.npy", coords)
        meta = {"n": total, "size": size, "mode": mode, "has_mask": has_mask}
        (tmp / "meta.json").write_text(json.dumps({**meta, "volumes": volumes, "images": images}))

    final.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(final, write)
    return final, True


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


class PatchBatchSampler(Sampler):
    """Index blocks for batched memmap reads: each batch sorted ascending (reads go forward
    through the file); with ``shuffle`` a fresh permutation per epoch, seeded by (run seed,
    epoch) like :class:`anogan_lightning.data.base.EpochSampler`."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.epoch = torch.initial_seed(), 0  # see data.base.EpochSampler
        self.loader_generator = torch.Generator()  # the DataLoader's: worker seeds, per epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader_generator.manual_seed((self.seed * 100_003 + epoch + 50_000) % 2**63)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        order = torch.randperm(self.n, generator=g).numpy() if self.shuffle else np.arange(self.n)
        for i in range(len(self)):
            yield np.sort(order[i * self.batch_size : (i + 1) * self.batch_size])


# ------------------------------------------------------------------------------ datamodule


class OCTVolumeDataModule(AnomalyDataModule):
    """OCT volumes -> flattened-retina patches; see the module docstring."""

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str | None = None,
        image_size: int = 64,
        train_patches_per_bscan: int = 8,
        grid_stride: int | None = None,
        val_volumes: int = 2,
        intensity_percentiles: tuple[float, float] = (0.5, 99.5),
        spacing_x_um: float | None = None,
        target_spacing_x_um: float | None = 22.0,
        flatten: bool = True,
        crop_height: int = 64,
        below_bm: int = 8,
        synthetic_train: int = 16,
        synthetic_test: int = 6,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, num_workers, pin_memory)
        if crop_height < image_size:
            raise ValueError(f"crop_height={crop_height} must be >= image_size={image_size}")
        if not 0 <= below_bm < crop_height:
            raise ValueError(f"below_bm={below_bm} must lie in [0, crop_height={crop_height})")
        if train_patches_per_bscan < 1 or val_volumes < 0 or image_size < 1:
            raise ValueError(
                "train_patches_per_bscan and image_size must be >= 1, val_volumes >= 0"
            )
        lo, hi = intensity_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"intensity_percentiles={intensity_percentiles}: need 0 <= lo < hi <= 100"
            )
        self.save_hyperparameters()
        self.root = Path(root) if root is not None else None
        self.cache_dir = Path(cache_dir if cache_dir is not None else "outputs/cache/oct_volume")
        self.train_patches_per_bscan = train_patches_per_bscan
        self.grid_stride = grid_stride or image_size
        self.val_volumes = val_volumes
        self.settings = PrepSettings(
            (float(lo), float(hi)),
            spacing_x_um,
            target_spacing_x_um,
            flatten,
            crop_height,
            below_bm,
        )
        self.synthetic = (synthetic_train, synthetic_test)
        self.seed = seed
        self.cache_stats = {
            "volumes_built": 0,
            "volumes_cached": 0,
            "splits_built": 0,
            "splits_cached": 0,
        }

    # -- loaders: one memmap read per batch ---------------------------------------------------
    def _loader(self, ds, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: the {name} split is not set up")
        sampler = PatchBatchSampler(len(ds), batch_size, shuffle, shuffle and len(ds) > batch_size)
        return DataLoader(
            ds,
            batch_size=None,  # the sampler yields whole batches; the dataset reads them at once
            sampler=sampler,
            generator=sampler.loader_generator,  # not the global RNG: resumable
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    # -- setup --------------------------------------------------------------------------------
    def data_root(self) -> Path:
        """``root``, or the synthetic volumes (written on first use)."""
        if self.root is not None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"OCT volume root {self.root} does not exist (data.root)")
            return self.root
        n_train, n_test = self.synthetic
        folder = self.cache_dir / f"synthetic-{_digest([n_train, n_test, self.seed])[:10]}"
        return write_synthetic_volumes(folder, n_train, n_test, self.seed)

    def _prepare(self, sources: list[VolumeSource], name: str) -> list[Path]:
        dirs = []
        t0 = time.perf_counter()
        for i, src in enumerate(sources, 1):
            d, built = cached_volume(src, self.settings, self.cache_dir)
            self.cache_stats["volumes_built" if built else "volumes_cached"] += 1
            dirs.append(d)
            if built and (i % 10 == 0 or i == len(sources)):
                log.info("oct_volume %s: prepared %d/%d volumes", name, i, len(sources))
        log.info(
            "oct_volume %s: %d volumes ready in %.1f s", name, len(dirs), time.perf_counter() - t0
        )
        return dirs

    def _split(self, dirs: list[Path], name: str, mode: str) -> PatchDataset:
        folder, built = build_patch_cache(
            dirs,
            self.cache_dir,
            self.image_size,
            mode,
            self.train_patches_per_bscan,
            self.grid_stride,
            self.seed,
        )
        self.cache_stats["splits_built" if built else "splits_cached"] += 1
        ds = PatchDataset(folder)
        log.info(
            "oct_volume %s: %d patches (%d anomalous) from %d volumes%s",
            name,
            len(ds),
            int(ds.labels.sum()),
            len(dirs),
            " (cached)" if not built else "",
        )
        return ds

    def _eval_volumes(self, root: Path) -> tuple[list[Path], list[Path]]:
        test = self._prepare(list_sources(root / "test", need_labels=True), "test")
        if (root / "val").is_dir():
            return self._prepare(list_sources(root / "val", need_labels=True), "val"), test
        labels = [json.loads((d / "meta.json").read_text())["label"] for d in test]
        if self.val_volumes >= len(test):
            raise ValueError(
                f"val_volumes={self.val_volumes} leaves no test volume of the {len(test)} in "
                f"{root / 'test'}; lower it or add {root / 'val'}"
            )
        rng = np.random.default_rng(self.seed)
        pools = [[i for i in rng.permutation(len(test)) if labels[i] == c] for c in (1, 0)]
        val_idx: list[int] = []
        while len(val_idx) < self.val_volumes:  # alternate diseased / healthy
            for pool in pools:
                if pool and len(val_idx) < self.val_volumes:
                    val_idx.append(int(pool.pop(0)))
        keep = sorted(set(range(len(test))) - set(val_idx))
        return [test[i] for i in sorted(val_idx)], [test[i] for i in keep]

    def setup(self, stage: str | None = None) -> None:
        """Prepare (or find in the cache) the volumes and patches ``stage`` needs."""
        fit = stage in (None, "fit", "validate")
        test = stage in (None, "test", "predict")
        if (not fit or self.train_set is not None) and (not test or self.test_set is not None):
            return
        root = self.data_root()
        val_dirs, test_dirs = self._eval_volumes(root)
        if fit and self.train_set is None:
            train = list_sources(root / "train", need_labels=False)
            for src in train:
                if src.label == 1:
                    raise ValueError(
                        f"{src.path}: labelled 1 (diseased), but train/ is for healthy "
                        "volumes only (AnoGAN learns the normal anatomy)"
                    )
            train_dirs = self._prepare(train, "train")
            self.train_set = self._split(train_dirs, "train", "random")
            self.val_set = self._split(val_dirs, "val", "grid")
        if test and self.test_set is None:
            self.test_set = self._split(test_dirs, "test", "grid")
