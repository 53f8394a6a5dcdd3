"""Batches of patch indices for :class:`~anogan_lightning.data.patch_dataset.PatchDataset`: one
sorted block per batch, so each batch is one forward read through the memory-mapped file."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


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
