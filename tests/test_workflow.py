"""Workflow guarantees: resume parity, evaluation-only runs, DDP parity, sweeps and reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, compose_cfg, tiny_overrides

from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _scores(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "scores.csv") as fh:
        return {r["id"]: float(r["score"]) for r in csv.DictReader(fh)}


def _cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "anogan_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path: Path):
    tiny = tiny_overrides("anogan")
    full = run(compose_cfg([*tiny, "trainer.max_epochs=3"], tmp_path / "full"))
    run(compose_cfg([*tiny, "trainer.max_epochs=1"], tmp_path / "first"))
    last = tmp_path / "first/checkpoints/last.ckpt"
    resumed = run(
        compose_cfg([*tiny, "trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "resumed")
    )
    for key in ("val/auroc", "test/auroc", "test/ap", "test/accuracy_at_val_threshold"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-9), key
    a, b = _scores(tmp_path / "full"), _scores(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


@pytest.mark.slow
def test_evaluation_only_run_reuses_the_weights(tmp_path: Path):
    tiny = tiny_overrides("anogan")
    trained = run(compose_cfg(tiny, tmp_path / "train"))
    ckpt = tmp_path / "train/checkpoints/model.ckpt"
    again = run(compose_cfg([*tiny, "fit=false", f"ckpt_path={ckpt}"], tmp_path / "eval"))
    assert again["test/auroc"] == pytest.approx(trained["test/auroc"])
    run(
        compose_cfg(
            [*tiny, "fit=false", f"ckpt_path={ckpt}", "method.mapping_steps=6"], tmp_path / "m"
        )
    )
    assert _scores(tmp_path / "m") != _scores(tmp_path / "eval")  # scoring settings apply
    assert not (tmp_path / "eval/checkpoints/last.ckpt").exists()  # no training happened
    with pytest.raises(FileNotFoundError, match="fit=false needs ckpt_path"):
        run(compose_cfg([*tiny, "fit=false", "ckpt_path=/nowhere.ckpt"], tmp_path / "bad"))


@pytest.mark.slow
def test_ddp_two_processes_score_like_one(tmp_path: Path):
    """2-process DDP (gloo, CPU): the mapping is split across ranks, the metrics gathered."""
    tiny = tiny_overrides("anogan")
    run(compose_cfg(tiny, tmp_path / "train"))
    ckpt = tmp_path / "train/checkpoints/model.ckpt"
    args = [*tiny, "fit=false", f"ckpt_path={ckpt}"]
    single = _cli(*args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _cli(
        *args,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'two'}",
        cwd=tmp_path,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "one/results.json").read_text())
    two = json.loads((tmp_path / "two/results.json").read_text())
    assert two["test/auroc"] == pytest.approx(one["test/auroc"], abs=1e-6)
    assert two["val/auroc"] == pytest.approx(one["val/auroc"], abs=1e-6)
    a, b = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 32  # every test image once, padding dropped
    assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4) for k in a)


@pytest.mark.slow
def test_predict_folder_with_a_corrupt_file(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from anogan_lightning.data.synthetic import make_split

    run(compose_cfg(tiny_overrides("anogan"), tmp_path / "train"))
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    ds = make_split(5, 64, "test", seed=3)
    for i in range(5):
        img = ((ds.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(img).save(scans / ("sub" if i == 4 else ".") / f"scan_{i}.png")
    (scans / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pred"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anogan_lightning.predict",
            f"ckpt={tmp_path / 'train/checkpoints/model.ckpt'}",
            f"input={scans}",
            "batch_size=2",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    bad = [r for r in rows if r["status"] == "unreadable"]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.jpg") and bad[0]["error"]
    good = [r for r in rows if r["status"] == "ok"]
    assert {Path(r["path"]).name for r in good} == {f"scan_{i}.png" for i in range(5)}
    assert all(
        r["anomalous"] in ("0", "1") and float(r["threshold"]) == float(good[0]["threshold"])
        for r in good
    )
    # the decision is the score against the checkpoint's validation threshold
    assert all(r["anomalous"] == str(int(float(r["score"]) >= float(r["threshold"]))) for r in good)
    assert all(r["residual"] for r in good)
    assert len(list((out / "heatmaps").glob("*.png"))) == 5
    assert "skipping unreadable image" in proc.stdout + proc.stderr  # the warning names it


@pytest.mark.slow
def test_multirun_over_two_methods_then_report(tmp_path: Path):
    """One job per method in one multirun; the report compares them in one table and plot."""
    from conftest import TINY_DATA

    from anogan_lightning import report

    sweep = tmp_path / "sweep"
    args = ["-m", "+method=anogan,autoencoder", *TINY_DATA, "data.image_size=16"]
    args += ["++method.width=8", f"hydra.sweep.dir={sweep}"]  # ++: no method at sweep level
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert yaml.safe_load((sweep / job / "config.yaml").read_text())["method"]["width"] == 8
    assert report.main([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "AUROC" not in ln]
    assert sorted(r.split(" | ")[1] for r in rows) == ["AnoGAN", "AutoEncoder"], md
    assert "residual " in md and "latent " in md  # each method's component AUROCs
    assert (sweep / "roc.png").stat().st_size > 0
    assert (sweep / "score_distributions.png").stat().st_size > 0
    assert len((sweep / "report.csv").read_text().splitlines()) == 3
