"""Run the benchmarks: ``make bench`` (all) or ``python benchmarks/run.py mapping overhead``.

Each ``benchmarks/<name>.py`` is a script that prints ``key=value`` lines; this runner starts
each in its own process (so one's threads and caches do not colour another's timings) and
prints everything under a ``# <name>`` header. Exit status: non-zero if any benchmark failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    skip = ("run", "common")
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in skip)


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or available()
    extra = [a for a in argv if a.startswith("-")]
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    failed = []
    # the checkout itself importable, installed or not (children run from benchmarks/)
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    for name in names:
        print(f"# {name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra], env=env)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode}\n", flush=True)
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
