"""Seeded, group-disjoint splits of B-scans (a group: a patient or an eye; no group is on two
sides of a split).

One primitive, :func:`shuffle_groups` (the groups sorted, then permuted by a generator seeded
with ``seed``), under every split: :func:`split_groups` cuts the shuffled groups by fractions
(``data=bscan_folder``'s pool of scans without a split, and its ``val_from=test`` hold-out), and
:func:`split_by_patient` takes the Sparse-GAN protocol's validation hold-out from the
shuffled patients (Kermany's ``val_from=train``).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

_KERMANY_NAME = re.compile(r"^[A-Za-z]+-(\d+)-\d+$")  # CLASS-PATIENT-N


def patient_id(path: str | Path) -> str | None:
    """Patient number of a Kermany ``CLASS-PATIENT-N`` file name, else None."""
    m = _KERMANY_NAME.match(Path(path).stem)
    return m.group(1) if m else None


def shuffle_groups(keys: Iterable[str], seed: int) -> list[str]:
    """The distinct ``keys`` sorted, then in the order of a permutation seeded by ``seed``."""
    keys = sorted(set(keys))
    return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]


def split_groups(keys: Iterable[str], fractions: Sequence[float], seed: int) -> list[set[str]]:
    """The shuffled groups (:func:`shuffle_groups`) cut into ``len(fractions)`` parts: part i
    holds ``round(fractions[i] * n)`` groups of the n, the last part the rest."""
    order = shuffle_groups(keys, seed)
    parts, start = [], 0
    for f in fractions[:-1]:
        n = round(f * len(order))
        parts.append(set(order[start : start + n]))
        start += n
    parts.append(set(order[start:]))
    return parts


def split_by_patient(
    normal: Sequence[Path],
    abnormal: Sequence[Path],
    val_normal: int,
    val_abnormal: int,
    seed: int,
    group_of: Callable[[Path], str | None] = patient_id,
) -> tuple[list[Path], list[Path], list[Path]]:
    """Seeded patient-disjoint hold-out: (train NORMAL, val NORMAL, val disease) paths.

    Patients are shuffled; val disease images are taken patient by patient, then val NORMAL
    images, first from patients already in val (their NORMAL scans cannot train anyway). The last
    patient taken may be cut to hit the count exactly; its remaining scans are not used. Train is
    the NORMAL images of every patient not in val. ``val_abnormal`` is capped at the disease
    images available and ``val_normal`` at half the NORMAL images, each with one warning.
    ``group_of`` gives a file's patient (default: the ``CLASS-PATIENT-N`` number; None: the
    file is a group of its own).
    """
    groups: dict[str, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
    for i, paths in enumerate((normal, abnormal)):
        for p in paths:
            pid = group_of(p)
            groups[f"patient {pid}" if pid is not None else f"file {p}"][i].append(p)
    keys = shuffle_groups(groups, seed)

    n_abnormal = min(val_abnormal, len(abnormal))
    if n_abnormal < val_abnormal:
        warnings.warn(
            f"val_abnormal={val_abnormal} but only {len(abnormal)} disease images in the "
            f"training folder; using all {n_abnormal}",
            stacklevel=2,
        )
    n_normal = min(val_normal, len(normal) // 2)
    if n_normal < val_normal:
        warnings.warn(
            f"val_normal={val_normal} capped at {n_normal}, half of the {len(normal)} NORMAL "
            "images in the training folder, so that training keeps the other half",
            stacklevel=2,
        )

    val_keys: set[str] = set()
    val_ab: list[Path] = []
    for k in keys:
        if len(val_ab) >= n_abnormal:
            break
        if groups[k][1]:
            val_ab += groups[k][1][: n_abnormal - len(val_ab)]
            val_keys.add(k)
    val_no: list[Path] = []
    for k in [k for k in keys if k in val_keys] + [k for k in keys if k not in val_keys]:
        if len(val_no) >= n_normal:
            break
        if groups[k][0]:
            val_no += groups[k][0][: n_normal - len(val_no)]
            val_keys.add(k)
    train = [p for k in sorted(groups) if k not in val_keys for p in groups[k][0]]
    return sorted(train), sorted(val_no), sorted(val_ab)
