"""Plumbing of the on-disk caches (:mod:`~anogan_lightning.data.volume_cache`,
:mod:`~anogan_lightning.data.patch_cache`, the normalised bands of
:class:`~anogan_lightning.data.bscan.retina_windows.RetinaBScanDataset`): content keys and
atomic folder writes.

One key scheme: an entry is named by the :func:`digest` of everything that determines its
content: its files by :func:`file_signature` (resolved path, size and mtime), its settings by
value, and :data:`CACHE_VERSION`, the version of the preprocessing code, so that a change of
the code cannot serve an entry it would no longer write. A folder entry is written to a
temporary folder and renamed into place, so concurrent runs never see a half-written entry; it
is complete when its ``meta.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

#: Bump when the preprocessing code (data/retina: segmentation, normalisation, patches; the
#: band quantisation of data/bscan/retina_windows.py; data/volume_cache.py) changes what a
#: cached entry holds: every cache key includes it, so no run reads an entry of older code.
CACHE_VERSION = 1


def digest(obj) -> str:
    """20 hex digits of the SHA-1 of ``obj`` as sorted JSON (the cache key)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_signature(path: Path | None) -> dict | None:
    """What identifies a file's content for the cache: resolved path, size, mtime (ns)."""
    if path is None:
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_atomic(final: Path, write) -> None:
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
