"""The quality benchmark (``anogan-lightning quality``) on tiny synthetic runs: both tables with
the right rows, a resumable sweep (a rerun skips finished jobs), a failed job reported rather
than fatal."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_DATA

from anogan_lightning import quality

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = [*TINY_DATA, "data.image_size=16", "method.width=8"]


def _quality(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "anogan_lightning.quality", "--data", "synthetic", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_quality_run_rerun_and_a_failed_job(tmp_path: Path):
    """Two methods x two seeds, and a third method whose jobs fail (an override only it has,
    with a bad value): both tables, a rerun that starts only the failed jobs again."""
    out = tmp_path / "q"
    args = ["--methods", "autoencoder,pix2pix_image,acae", "--seeds", "2", "--jobs", "2"]
    args += ["--budget", "00:00:05:00", "--out", str(out), *TINY, "method.feature_layer=99"]
    proc = _quality(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a job failed
    assert proc.stdout.count(": started") == 6 and proc.stdout.count(": finished in") == 4
    assert proc.stdout.count(": FAILED after") == 2
    with open(out / "quality.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["acae", "autoencoder", "pix2pix_image"]
    results = {
        (m, s): json.loads((out / f"sweep/{m}_seed{s}/results.json").read_text())
        for m in ("autoencoder", "pix2pix_image")
        for s in (0, 1)
    }
    for m in ("autoencoder", "pix2pix_image"):
        row = rows[m]
        assert row["n_finished"] == "2" and not row["failed"]
        mean = (results[(m, 0)]["test/auroc"] + results[(m, 1)]["test/auroc"]) / 2
        assert float(row["test_auroc_mean"]) == pytest.approx(mean, abs=1e-5)
        assert float(row["epochs_mean"]) == 1 and float(row["wall_min_mean"]) > 0
        assert float(row["steps_mean"]) == results[(m, 0)]["train/steps"] > 0
        assert any(k.startswith("test_auroc/fluid") for k in row)  # per-class columns
    ref = rows["autoencoder"]
    assert (ref["delta_vs_reference"], ref["delta_ci_low"], ref["delta_ci_high"]) == ("0", "0", "0")
    p2p = rows["pix2pix_image"]
    low, diff, high = (
        float(p2p[k]) for k in ("delta_ci_low", "delta_vs_reference", "delta_ci_high")
    )
    assert low <= diff <= high and p2p["delta_seed_pairs"] == "2"
    assert rows["acae"]["n_finished"] == "0" and "out of range" in rows["acae"]["failed"]
    md = (out / "quality.md").read_text()
    assert "| autoencoder | 2/2 |" in md and "| pix2pix_image | 2/2 |" in md
    assert "| acae | 0/2 |" in md and "Failed or incomplete jobs (2)" in md
    assert "- acae seed 0 (" in md and "feature_layer 99 out of range" in md
    assert "Δ vs autoencoder" in md
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()

    # a rerun skips the finished jobs, rewriting no result, and retries the failed ones
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("sweep/*/results.json")}
    assert len(mtimes) == 4
    again = _quality(*args, cwd=tmp_path)
    assert again.returncode == 1, again.stderr[-3000:]
    assert again.stdout.count("already finished, skipped") == 4
    assert again.stdout.count(": started") == 2 and "acae seed 1: started" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # the tables alone, from what has finished: no job starts, a missing one is listed
    summary = _quality(*args, "--seeds", "3", "--summary-only", cwd=tmp_path)
    assert summary.returncode == 1 and ": started" not in summary.stdout
    assert "| autoencoder | 2/3 |" in (out / "quality.md").read_text()
    assert "did not run" in (out / "quality.md").read_text()
    assert "tables of the finished jobs only" in (out / "quality.md").read_text()
    # seeds added later (--first-seed): the tables count the earlier seeds in the folder too
    later = _quality(*args, "--first-seed", "1", "--seeds", "1", "--summary-only", cwd=tmp_path)
    assert "| autoencoder | 2/2 |" in (out / "quality.md").read_text(), later.stdout[-2000:]
    assert "seeds 0, 1" in (out / "quality.md").read_text()
    # other settings in the same folder are refused
    other = _quality(*args[: -len(TINY) - 1], "trainer.max_epochs=2", cwd=tmp_path)
    assert other.returncode == 2 and "other settings" in other.stderr


@pytest.mark.slow
def test_ganr_maps_the_same_seeds_anogan_networks(tmp_path: Path):
    """With anogan and ganr both benchmarked, the ganr job waits for the anogan job of its seed
    and maps that run's checkpoint (the paper's same-GAN comparison), training nothing."""
    out = tmp_path / "q"
    args = ["--methods", "ganr,anogan", "--seeds", "1", "--jobs", "2", "--out", str(out)]
    args += [*TINY, "method.mapping_steps=3", "method.mapping_restarts=1", "method.progress=false"]
    proc = _quality(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if ": started" in line]
    finished_anogan = next(i for i, line in enumerate(lines) if "anogan seed 0: finished" in line)
    assert "anogan seed 0" in lines[started[0]] and started[1] > finished_anogan
    ckpt = out / "sweep/anogan_seed0/checkpoints/model.ckpt"
    job_log = (out / "sweep/ganr_seed0/quality_job.log").read_text().splitlines()[0]
    assert f"method.from_checkpoint={ckpt}" in job_log
    results = json.loads((out / "sweep/ganr_seed0/results.json").read_text())
    assert not results.get("train/steps")  # no training of its own


def test_a_method_override_no_benchmarked_method_has_is_an_error(capsys):
    """A ``method.<key>`` override reaches only the methods whose config has the key; one that
    reaches none of them would be dropped silently, so it is refused, naming the key."""
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "autoencoder,fanogan", "method.no_such_key=1"])
    assert "'no_such_key'" in capsys.readouterr().err
    args = quality.parse_args(["--methods", "autoencoder,fanogan", "method.arch=dcgan"])
    assert "method.arch=dcgan" in quality.job_overrides(args, "fanogan", 0)
    assert "method.arch=dcgan" not in quality.job_overrides(args, "autoencoder", 0)


def test_other_seeds_in_the_folder_join_the_tables(tmp_path: Path):
    for name in ("autoencoder_seed0", "autoencoder_seed3", "autoencoder_seedx", "acae_seed1"):
        (tmp_path / name).mkdir()
    jobs = [
        {"method": "autoencoder", "seed": 3, "name": "autoencoder_seed3"},
        {"method": "acae", "seed": 3, "name": "acae_seed3"},
    ]
    found = quality.with_other_seeds(tmp_path, jobs)
    # the methods keep the order of the jobs, an earlier seed does not move its method first
    assert [(j["method"], j["seed"]) for j in found] == [
        ("autoencoder", 0),
        ("autoencoder", 3),
        ("acae", 1),
        ("acae", 3),
    ]
    with pytest.raises(SystemExit):
        quality.parse_args(["--first-seed", "-1"])


def test_ganr_without_its_anogan_checkpoint_fails_with_the_reason(tmp_path: Path):
    job = {"method": "ganr", "seed": 0, "name": "ganr_seed0", "index": 2, "total": 2}
    job |= {"after": "anogan_seed0", "overrides": []}
    job["checkpoint"] = str(tmp_path / "anogan_seed0/checkpoints/model.ckpt")
    messages: list[str] = []
    quality.run_job(job, tmp_path, messages.append)
    assert "FAILED" in messages[0] and "no AnoGAN checkpoint" in messages[0]
    assert "anogan_seed0 did not finish" in (tmp_path / "ganr_seed0/error.txt").read_text()
