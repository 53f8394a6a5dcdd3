"""The data-module base shared by every dataset: loaders, batch format, split bookkeeping."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

log = logging.getLogger(__name__)


def collate_skip_none(items: list) -> dict | None:
    """Collate dict samples, dropping ``None`` (an unreadable file that a dataset skipped)."""
    kept = [it for it in items if it is not None]
    if len(kept) < len(items):
        log.warning("skipped %d unreadable sample(s) in this batch", len(items) - len(kept))
    if not kept:
        return None
    return default_collate(kept)


class EpochSampler(Sampler[int]):
    """A fresh permutation each epoch from a generator seeded by (seed, epoch).

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed from a
    checkpoint sees the same order in its later epochs as an uninterrupted one (a plain
    ``shuffle=True`` draws from the global RNG, whose state a restart does not restore).
    ``loader_generator``, when given, is reseeded in ``set_epoch`` too: passed to the
    DataLoader as its ``generator``, it makes the loader draw its worker seeds from it rather
    than from the global RNG. ``seed`` defaults to ``torch.initial_seed()``, i.e. the run's
    ``seed_everything`` value.
    """

    def __init__(
        self, n: int, seed: int | None = None, loader_generator: torch.Generator | None = None
    ) -> None:
        self.n = n
        self.seed = torch.initial_seed() if seed is None else seed
        self.loader_generator = loader_generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.loader_generator is not None:
            self.loader_generator.manual_seed((self.seed * 100_003 + epoch + 50_000) % 2**63)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.n, generator=g).tolist())


class AnomalyDataModule(pl.LightningDataModule):
    """Train on normal images only; validate and test on both classes.

    Subclasses implement :meth:`setup` and assign ``self.train_set``, ``self.val_set`` and
    ``self.test_set``: datasets whose items are dicts with ``x``, ``label``, ``id`` (and ``mask``;
    and ``cls``, the image's class name, where the data knows sub-classes of its anomalies).
    """

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def check(self, stage: str | None = None) -> dict[str, int]:
        """Cheap validation before :meth:`setup` (before training): list what ``stage`` needs
        without reading it, raising FileNotFoundError / ValueError that names a missing path;
        the number of samples per split found. Data made in memory has nothing to list: {}."""
        return {}

    def _loader(self, ds: Dataset | None, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: the {name} split is not set up")
        generator = torch.Generator() if shuffle else None
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=EpochSampler(len(ds), loader_generator=generator) if shuffle else None,
            generator=generator,
            drop_last=shuffle and len(ds) > batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skip_none,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", False, self.eval_batch_size)

    def split_files(self) -> dict[str, list[str]]:
        """Per set-up split, the source files its samples come from (sample names where there
        are no files, e.g. synthetic data), for the run's provenance."""
        out = {}
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_set")
            if ds is None:
                continue
            if hasattr(ds, "paths"):  # one file per sample (B-scan folders)
                out[name] = [str(p) for p in ds.paths]
            elif hasattr(ds, "image_ids"):  # patches of volumes: "<volume file>:b<B-scan>"
                out[name] = sorted({i.rsplit(":b", 1)[0] for i in ds.image_ids})
            elif hasattr(ds, "ids"):
                out[name] = [str(i) for i in ds.ids]
        return out

    def split_summary(self) -> dict[str, dict[str, int]]:
        """Counts per split and class, for the log and the results file."""
        out = {}
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_set")
            if ds is None:
                continue
            labels = torch.as_tensor(ds.labels)
            out[name] = {"normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum())}
        return out


class ArrayDataset(Dataset):
    """In-memory images (N, 1, H, W) in [-1, 1] with labels, names, optional masks and optional
    class names (``cls`` in the items: the sub-class of each image, for per-class metrics)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        ids: list[str],
        masks: torch.Tensor | None = None,
        classes: list[str] | None = None,
    ) -> None:
        assert images.ndim == 4 and images.shape[1] == 1, images.shape
        assert len(images) == len(labels) == len(ids)
        assert classes is None or len(classes) == len(ids)
        self.images = images
        self.labels = labels.long()
        self.ids = ids
        self.masks = masks
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.images[i], "label": self.labels[i], "id": self.ids[i]}
        if self.masks is not None:
            item["mask"] = self.masks[i]
        if self.classes is not None:
            item["cls"] = self.classes[i]
        return item
