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

The pipeline, one file per step:

- :mod:`~anogan_lightning.data.volume_sources`: the volumes of a folder with their masks and
  ``labels.csv`` rows (:mod:`~anogan_lightning.data.volume_labels`). A val/test volume
  without a mask takes its row of ``labels.csv`` for every patch (image-level only: it then
  has no pixel masks); a volume with neither is an error naming it.
- :mod:`~anogan_lightning.data.volume_cache`: each volume normalised, resampled, segmented,
  flattened and cropped once, cached under ``<cache_dir>/volumes/``.
- :mod:`~anogan_lightning.data.patch_cache`: the patches of a split under
  ``<cache_dir>/patches/``: train ``train_patches_per_bscan`` random positions per B-scan,
  val/test a grid with stride ``grid_stride`` (default ``image_size``: every pixel scored once).
- :mod:`~anogan_lightning.data.patch_dataset` and :mod:`~anogan_lightning.data.patch_sampler`:
  a split read back memory-mapped, one sorted block of indices per batch (``batch_size=None``
  in the DataLoader). ``mask`` is in the batches of a split when every volume of it has a mask.

Val: ``<root>/val`` when it exists, otherwise ``val_volumes`` volumes held out of ``test/``
(seeded, alternating diseased and healthy so that both classes are there when possible).

Cache (``cache_dir``; the config's default is ``${paths.log_dir}/cache/oct_volume``, i.e.
``outputs/cache/oct_volume`` beside the runs, because a data root is often read-only): keyed by
file contents and settings (:mod:`~anogan_lightning.data.cache_files`); the second run skips
segmentation. Remove the folder to reclaim space.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from anogan_lightning.data.base import AnomalyDataModule
from anogan_lightning.data.cache_files import digest
from anogan_lightning.data.patch_cache import build_patch_cache
from anogan_lightning.data.patch_dataset import PatchDataset
from anogan_lightning.data.patch_sampler import PatchBatchSampler
from anogan_lightning.data.synthetic_volume import write_synthetic_volumes
from anogan_lightning.data.volume_cache import PrepSettings, cached_volume
from anogan_lightning.data.volume_sources import VolumeSource, list_sources

log = logging.getLogger(__name__)


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
        folder = self.cache_dir / f"synthetic-{digest([n_train, n_test, self.seed])[:10]}"
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
