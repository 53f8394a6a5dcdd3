"""The patch cache: the patches of one split's prepared volumes
(:mod:`~anogan_lightning.data.volume_cache`), streamed volume by volume into memory-mapped
arrays (never all volumes in memory).

- ``"random"`` (train): ``count`` positions per B-scan, the patch centre between ILM and BM
  (the AnoGAN paper: 1,000,000 patches from 270 volumes, ~75 per B-scan). Positions are drawn
  once per cache, seeded by ``seed`` and the volume's key, so the training set is fixed like
  the paper's. Label 0.
- ``"grid"`` (val/test): a grid with stride ``stride`` over the band, keeping patches that
  touch the retina. Label 1 when any mask pixel of the volume lies inside the patch (the
  paper's protocol); a volume without a mask gives its own label to every patch.

``<cache_dir>/patches/<key>/``: ``x.npy`` (N, S, S) uint8 patches, ``labels.npy``,
``coords.npy`` (N, 3): (B-scan index in the split, y, x), ``mask.npy`` when every volume of
the split has a mask, ``meta.json`` (the volumes and B-scans behind the patches); keyed by the
volume keys and the patch settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anogan_lightning.data.cache_files import CACHE_VERSION, digest, write_atomic
from anogan_lightning.data.retina.patches import (
    extract_patches,
    grid_patch_positions,
    patch_labels,
    random_patch_positions,
)


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
            random_patch_positions(ilm[b], bm[b], height, size, count, rng) for b in range(len(ilm))
        ]
    return [grid_patch_positions(ilm[b], bm[b], height, size, stride) for b in range(len(ilm))]


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
    key = digest(
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
                x[i:j] = extract_patches(np.asarray(band[b]), p, size)
                if mode == "grid":
                    if mask is not None:
                        mb = np.asarray(mask[b])
                        labels[i:j] = patch_labels(mb, p, size)
                        if m is not None:
                            m[i:j] = extract_patches(mb, p, size)
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
    write_atomic(final, write)
    return final, True
