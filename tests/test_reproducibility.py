"""Same command, same seed, same machine: identical scores in two separate processes at the
default thread count; and a results.json alone reruns the run that made it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from anogan_lightning import provenance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# a fresh process at the default thread count (`make test` sets one thread for its workers)
DEFAULT_ENV = {
    k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
}


def _train(overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "anogan_lightning.train", *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=DEFAULT_ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _tiny(method: str) -> list[str]:
    # the main job's code path (entry point, data module, fit, validate, test) at tiny sizes;
    # more images and steps than the unit tests, so that batches reach multi-threaded kernels
    over = tiny_overrides(method, image_size=32)
    over += ["data.n_train=128", "data.n_val=32", "data.n_test=32", "method.width=16"]
    return [o for o in over if not o.startswith("method.width=8")]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["anogan"])
def test_two_processes_give_identical_scores(method: str, tmp_path: Path):
    first = _train(_tiny(method), tmp_path / "a")
    # the second run is rebuilt from the first one's results.json alone
    overrides = first["provenance/overrides"]
    assert overrides == _tiny(method)
    second = _train(overrides, tmp_path / "b")
    assert (tmp_path / "a/scores.csv").read_bytes() == (tmp_path / "b/scores.csv").read_bytes()
    for key in ("val/auroc", "test/auroc", "test/ap", "val/youden_threshold"):
        assert first[key] == second[key], key
    assert first["provenance/threads"] == second["provenance/threads"] == _default_threads()
    assert first["provenance/deterministic_algorithms"] is True


def _default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=DEFAULT_ENV, capture_output=True, text=True
    )
    return int(proc.stdout)


def test_results_carry_provenance(tmp_path: Path):
    from conftest import compose_cfg

    from anogan_lightning.train import run

    results = run(compose_cfg(tiny_overrides("autoencoder"), tmp_path))
    info = provenance.of(json.loads((tmp_path / "results.json").read_text()))
    for key in ("version", "torch", "lightning", "device", "precision", "threads", "command"):
        assert info[key] is not None, key
    assert info["precision"] == "32-true" and info["accelerator"] == "cpu"
    assert info["data_train_files"] == results["data/train_normal"]
    assert info["data_test_files"] == results["data/test_normal"] + results["data/test_anomalous"]
    assert len(info["data_test_sha256"]) == 64
    if (REPO / ".git").exists():
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)
    for key in ("time/fit_s", "time/validate_s", "time/test_s", "time/total_s"):
        assert results[key] > 0, key


def test_file_list_digest_tracks_files(tmp_path: Path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"12")
    b.write_bytes(b"345")
    n, digest = provenance.file_list_digest([str(b), str(a)], tmp_path)
    assert n == 2
    assert provenance.file_list_digest([str(a), str(b)], tmp_path)[1] == digest  # order-free
    b.write_bytes(b"3456")  # a changed file changes the digest
    assert provenance.file_list_digest([str(a), str(b)], tmp_path)[1] != digest
    moved = tmp_path / "sub"
    moved.mkdir()
    # the digest is relative to the data root: the same folder elsewhere gives the same digest
    (moved / "a.png").write_bytes(b"12")
    (moved / "b.png").write_bytes(b"3456")
    same = provenance.file_list_digest([str(moved / "a.png"), str(moved / "b.png")], moved)
    assert same[1] == provenance.file_list_digest([str(a), str(b)], tmp_path)[1]
