"""The prepared-volume cache: each OCT volume read, normalised, resampled, segmented, flattened
and cropped once (:mod:`anogan_lightning.data.retina`), then kept on disk.

Preprocessing per volume: intensities to [-1, 1] (per-volume percentiles), columns resampled
to ``target_spacing_x_um`` (22 µm as in the AnoGAN paper; ``None`` keeps them), ILM/BM
detection, flattening on BM and a band of ``crop_height`` rows with BM ``below_bm`` rows above
its bottom.

``<cache_dir>/volumes/<key>/``: ``band.npy`` (n, crop_height, W) uint8 (the [-1, 1] band
quantised to 256 levels, x = q / 127.5 - 1, like 8-bit OCT exports), ``ilm.npy``/``bm.npy``
(n, W) rows in the band, ``mask.npy`` when annotated, ``meta.json``. The key hashes the
volume's and mask's (resolved path, size, mtime) and every preprocessing setting: a changed
file or setting gives a new key (rebuilt), the same ones are a hit (no segmentation). Stale
entries are not deleted; remove the folder to reclaim space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anogan_lightning.data.cache_files import CACHE_VERSION, digest, file_signature, write_atomic
from anogan_lightning.data.readers import read_mask, read_volume, resolve_spacing_x
from anogan_lightning.data.retina.normalize import (
    flatten_crop,
    normalize_intensity,
    resample_mask_x,
    resample_x,
    shift_columns,
)
from anogan_lightning.data.retina.segment import BoundaryParams, detect_boundaries
from anogan_lightning.data.volume_sources import VolumeSource

REFERENCE_SPACING_X_UM = 11.5  # column spacing of the BoundaryParams reference B-scan


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
    x = normalize_intensity(vol.data, s.intensity_percentiles)
    mask = read_mask(src.mask, vol.data.shape) if src.mask is not None else None
    spacing_x = None
    if s.target_spacing_x_um is not None:
        spacing_x = resolve_spacing_x(vol, s.spacing_x_um)
        x = resample_x(x, spacing_x, s.target_spacing_x_um)
        if mask is not None:
            mask = resample_mask_x(mask, x.shape[-1])
    col_um = s.target_spacing_x_um or vol.spacing[2] or s.spacing_x_um or REFERENCE_SPACING_X_UM
    params = BoundaryParams().scaled(rows=h / 496, cols=REFERENCE_SPACING_X_UM / col_um)
    ilm, bm = detect_boundaries(x, params)
    band, ilm_b, bm_b, shifts = flatten_crop(x, ilm, bm, s.crop_height, s.below_bm, s.flatten)
    out: dict = {
        "band": np.round((band + 1.0) * 127.5).astype(np.uint8),
        "ilm": np.clip(ilm_b, -32768, 32767).astype(np.int16),
        "bm": bm_b.astype(np.int16),
    }
    lesion_voxels = kept_voxels = 0
    if mask is not None:
        out["mask"] = shift_columns(mask, shifts, s.crop_height)
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


def cached_volume(src: VolumeSource, s: PrepSettings, cache_dir: Path) -> tuple[Path, bool]:
    """The prepared volume's cache folder, built if missing; (folder, built now)."""
    key = digest(
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
    write_atomic(final, write)
    return final, True
