"""Shared LightningDataModules. Every batch is a dict:

- ``x``: (B, 1, H, W) float32 in [-1, 1]
- ``label``: (B,) int64, 0 = normal, 1 = anomalous
- ``id``: list[str], a file path or a generated sample name
- ``mask``: (B, 1, H, W) float32 in {0, 1}, only where pixel annotations exist
"""

from anogan_lightning.data.base import AnomalyDataModule, collate_skip_none

__all__ = ["AnomalyDataModule", "collate_skip_none"]
