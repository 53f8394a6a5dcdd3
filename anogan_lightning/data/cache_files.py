"""Plumbing of the on-disk caches (:mod:`~anogan_lightning.data.volume_cache`,
:mod:`~anogan_lightning.data.patch_cache`): content keys and atomic folder writes.

A cache entry is a folder named by a digest of everything that determines its content (files
by resolved path, size and mtime; settings by value). It is written to a temporary folder and
renamed into place, so concurrent runs never see a half-written entry; an entry is complete
when its ``meta.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path


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
