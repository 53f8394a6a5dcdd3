"""The optional ``labels.csv`` of an OCT volume folder: ``file,label`` rows, label 0 (healthy) or
1 (diseased), for volumes without a voxel mask. A header row (``file``/``volume``/``name``)
and ``#`` comment rows are skipped; the file name may be given with or without its extension.
"""

from __future__ import annotations

import csv
from pathlib import Path


def read_labels(folder: Path) -> dict[str, int]:
    """``{file name or stem: label}`` from ``folder/labels.csv``; {} without the file."""
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
