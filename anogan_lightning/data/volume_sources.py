"""The OCT volumes of a split folder and what labels them: ``masks/<stem>.*`` voxel masks and
``labels.csv`` rows.

Folder layout::

    <name>.<ext>            volumes (.vol, .e2e, .npy, .npz, .tif/.tiff, .nii/.nii.gz)
    masks/<name>.<mext>     optional voxel annotation per volume (same shape; non-zero = lesion;
                            the volume formats minus .vol/.e2e)
    labels.csv              optional "file,label" rows (:mod:`anogan_lightning.data.volume_labels`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anogan_lightning.data.readers import MASK_SUFFIXES, is_volume_file, stem
from anogan_lightning.data.volume_labels import read_labels


@dataclass(frozen=True)
class VolumeSource:
    """A volume file, its optional mask file and optional volume label (labels.csv)."""

    path: Path
    mask: Path | None = None
    label: int | None = None


def list_sources(folder: Path, need_labels: bool) -> list[VolumeSource]:
    """Volumes of one folder with their masks (``masks/<stem>.*``) and labels.csv entries.

    ``need_labels``: every volume needs a mask or a label (val/test); raises ValueError naming
    the first that has neither.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"OCT volume folder {folder} does not exist")
    labels = read_labels(folder)
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
