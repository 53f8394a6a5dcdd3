"""Provenance of a run: the code, software, machine, command and data that made its numbers.

Everything here is cheap (no file is read, only listed and stat'ed) and flat, so it sits in
``results.json`` beside the metrics under ``provenance/...`` keys, and a ``results.json`` alone
is enough to rerun the run that made it (``provenance/command``, ``provenance/commit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PREFIX = "provenance/"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code() -> dict:
    """Project version and git commit of the package's checkout (None outside a checkout);
    ``dirty`` is True when tracked files differ from the commit."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "version": _version("anogan-lightning"),
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_and_machine(trainer=None) -> dict:
    """Library versions, device, precision and thread counts in force now."""
    cuda = torch.cuda.is_available()
    out = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that weights-only unpickling refuses
        "lightning": _version("pytorch-lightning"),
        "torchmetrics": _version("torchmetrics"),
        "hydra": _version("hydra-core"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "hostname": platform.node(),
    }
    if trainer is not None:
        acc = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
        devices = [str(d) for d in getattr(trainer.strategy, "parallel_devices", None) or []]
        out.update(
            {
                "accelerator": acc,
                "device": devices[0] if devices else str(trainer.strategy.root_device),
                "world_size": trainer.world_size,
                "precision": str(trainer.precision),
            }
        )
        if acc == "cuda" and cuda:
            out["gpu"] = torch.cuda.get_device_name(trainer.strategy.root_device)
    return out


def command(overrides: list[str] | None = None) -> dict:
    """The exact command line; with Hydra, the equivalent ``python -m`` form and its overrides."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and argv:  # run as `python -m <module>`
        argv = ["python", "-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    out = {"command": shlex.join(argv), "cwd": os.getcwd()}
    if overrides is not None:
        out["overrides"] = list(overrides)
    return out


def file_list_digest(files: list[str], root: str | Path | None = None) -> tuple[int, str]:
    """(number of files, sha256 of the sorted ``relative path<TAB>size`` lines).

    Entries that are not files on disk (e.g. synthetic sample names) enter by name alone.
    A file renamed, added, removed or changed in size changes the digest; contents are not
    read, so it costs one ``stat`` per file.
    """
    base = Path(root) if root else None
    lines = []
    for f in files:
        p = Path(f)
        try:
            size = p.stat().st_size if p.is_file() else None
        except OSError:
            size = None
        name = str(f)
        if base is not None and size is not None:
            with contextlib.suppress(ValueError):  # outside the root: the path as given
                name = str(p.resolve().relative_to(base.resolve()))
        lines.append(f"{name}\t{size}" if size is not None else name)
    lines.sort()
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def data(datamodule, data_cfg: dict | None = None) -> dict:
    """Data root, and per split the number of source files and their list's digest."""
    root = (data_cfg or {}).get("root")
    out: dict = {"data_root": str(Path(root).resolve()) if root else None}
    files = datamodule.split_files() if hasattr(datamodule, "split_files") else {}
    for split, names in files.items():
        n, digest = file_list_digest(names, root)
        out[f"data_{split}_files"] = n
        out[f"data_{split}_sha256"] = digest
    return out


def flatten(info: dict) -> dict:
    """``{"commit": ...}`` -> ``{"provenance/commit": ...}``."""
    return {PREFIX + k: v for k, v in info.items()}


def of(results: dict) -> dict:
    """The provenance entries of a results dict, without the prefix."""
    return {k[len(PREFIX) :]: v for k, v in results.items() if k.startswith(PREFIX)}
