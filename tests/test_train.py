"""The entry point: the exact command line, its files, overrides, multirun and failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import METHODS, REPO, check_results_against_scores, compose_cfg, tiny_overrides
from omegaconf import OmegaConf

from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RESULT_KEYS = [
    f"{split}/{k}"
    for split in ("val", "test")
    for k in ("auroc", "ap", "sensitivity", "specificity", "precision", "recall")
] + [
    "test/accuracy_at_val_threshold",
    "test/sensitivity_at_val_threshold",
    "test/auroc_residual",
    "test/auroc_discrimination",
    "test/auroc_pd",
]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "anogan_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_command_line_writes_every_artefact(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _cli(*tiny_overrides("anogan"), "figures=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in RESULT_KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    check_results_against_scores(run_dir, results)
    for name in ("scores.csv", "roc.png", "score_hist.png", "samples.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "checkpoints/model.ckpt").is_file()
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    header = (run_dir / "scores.csv").read_text().splitlines()[0]
    assert header == "id,label,score,residual,discrimination,pd,class"
    # the same table is printed at the end
    assert "| auroc |" in proc.stdout and f"{results['test/auroc']:.4f}" in proc.stdout
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.method._target_.endswith("AnoGAN") and cfg.trainer.inference_mode is False


def test_no_method_lists_the_methods(tmp_path: Path):
    proc = _cli(cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no method selected")
    assert all(m in lines[0] for m in METHODS)


@pytest.mark.slow
def test_multirun_sweeps_an_override(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides("anogan") if not a.startswith("method.mapping_steps")]
    proc = _cli("-m", *args, "method.mapping_steps=1,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted(
        OmegaConf.load(sweep / str(i) / "config.yaml").method.mapping_steps for i in (0, 1)
    )
    assert steps == [1, 4]
    assert all((sweep / str(i) / "results.json").is_file() for i in (0, 1))


def test_overrides_compose(tmp_path: Path):
    cfg = compose_cfg(
        [
            "+method=anogan",
            "data=kermany",
            "data.root=/data/OCT2017",
            "trainer=gpu",
            "trainer.precision=bf16-mixed",
            "logger=wandb",
            "method.lambda_fm=0.2",
            "seed=3",
        ],
        tmp_path,
    )
    assert cfg.data.root == "/data/OCT2017" and cfg.data._target_.endswith("KermanyDataModule")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.inference_mode is False  # from the method's config, not the user
    assert cfg.method.lambda_fm == 0.2 and cfg.seed == 3
    assert cfg.method.image_size == cfg.data.image_size
    assert cfg.logger.wandb._target_.endswith("WandbLogger")


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path: Path):
    a = run(compose_cfg(tiny_overrides("anogan"), tmp_path / "a"))
    b = run(compose_cfg(tiny_overrides("anogan"), tmp_path / "b"))
    keys = [k for k in a if k.startswith(("val/", "test/"))]
    assert keys and all(a[k] == pytest.approx(b[k], nan_ok=True) for k in keys)
    # figures=false (the tiny settings): the numbers, no figure
    assert (tmp_path / "a/scores.csv").is_file() and not list((tmp_path / "a").rglob("*.png"))


def test_inference_mode_override_fails_early(tmp_path: Path):
    cfg = compose_cfg([*tiny_overrides("anogan"), "trainer.inference_mode=true"], tmp_path)
    with pytest.raises(ValueError, match="inference_mode=false"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()  # failed before training


def test_divergence_stops_with_one_message(tmp_path: Path, monkeypatch):
    """A NaN loss names the step and the loss term; the last good checkpoint stays."""
    from anogan_lightning.nets.dcgan import DCGANDiscriminator

    forward = DCGANDiscriminator.forward
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += 1
        out = forward(self, x)
        return out * math.nan if calls["n"] > 3 * 4 * 2 else out  # 2nd epoch: 4 steps/epoch

    monkeypatch.setattr(DCGANDiscriminator, "forward", poisoned)
    cfg = compose_cfg([*tiny_overrides("anogan"), "trainer.max_epochs=3"], tmp_path)
    with pytest.raises(SystemExit) as err:
        run(cfg)
    msg = str(err.value)
    assert "train/loss_d = nan" in msg and "global step" in msg and "epoch 2" in msg
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    state = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    weights = {k: v for k, v in state["state_dict"].items() if k != "threshold"}
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_wandb_offline_run_folder(tmp_path: Path, monkeypatch):
    """logger=wandb works without an account or network (WANDB_MODE=offline)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    results = run(compose_cfg([*tiny_overrides("anogan"), "logger=wandb"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and math.isfinite(results["test/auroc"])
    assert any(runs[0].rglob("*.wandb"))  # the run's log, for `wandb sync`


def test_bf16_mixed_precision_keeps_the_mapping_in_float32(tmp_path: Path, monkeypatch):
    """trainer.precision=bf16-mixed (CPU autocast here; the same path as on a GPU): training
    and the latent mapping run, z and the mapping losses stay float32."""
    from anogan_lightning.methods.anogan import AnoGAN

    seen = {}
    original = AnoGAN.latent_mapping

    def spy(*args, **kwargs):
        m = original(*args, **kwargs)
        seen.update(z=m.z.dtype, score=m.score.dtype, autocast=torch.is_autocast_enabled("cpu"))
        return m

    monkeypatch.setattr(AnoGAN, "latent_mapping", staticmethod(spy))
    results = run(
        compose_cfg([*tiny_overrides("anogan"), "trainer.precision=bf16-mixed"], tmp_path)
    )
    assert math.isfinite(results["test/auroc"])
    assert seen == {"z": torch.float32, "score": torch.float32, "autocast": True}


def test_per_class_auroc_and_cis_through_the_entry_point(tmp_path: Path):
    """scores.csv carries each image's class; test/auroc/<class> is the AUROC of the normals
    plus that class, computed from scores.csv; every AUROC has a CI around it."""
    import csv

    from anogan_lightning.evaluation import metrics

    results = run(compose_cfg(tiny_overrides("autoencoder"), tmp_path))
    with open(tmp_path / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["class"] for r in rows if r["label"] == "0"} == {"normal"}
    classes = {r["class"] for r in rows if r["label"] == "1"}
    assert classes and classes <= {
        "fluid",
        "foci",
        "drusen",
        "fluid+foci",
        "fluid+drusen",
        "foci+drusen",
    }
    for name in classes:
        sub = [r for r in rows if r["class"] in ("normal", name)]
        scores = torch.tensor([float(r["score"]) for r in sub])
        labels = torch.tensor([int(r["label"]) for r in sub])
        expected = metrics.auroc(scores, labels)
        assert results[f"test/auroc/{name}"] == pytest.approx(expected, abs=1e-6)
        assert (
            results[f"test/auroc/{name}_ci_low"]
            <= expected
            <= results[f"test/auroc/{name}_ci_high"]
        )
    for key in ("test/auroc", "test/auroc_l1", "test/auroc_latent", "val/auroc"):
        assert results[f"{key}_ci_low"] <= results[key] <= results[f"{key}_ci_high"], key
    assert results["train/epochs"] == 1 and results["train/steps"] == results["train/batches"] > 0
    assert results["time/total_s"] > results["time/fit_s"] > 0


def test_incomplete_training_reports_no_auroc(tmp_path: Path, monkeypatch):
    """A method whose training_complete() is False: results.json says incomplete with the
    reason and holds no AUROC; a rerun skips the job and says the same; the report lists it."""
    from anogan_lightning import report
    from anogan_lightning.artefacts import read_finished
    from anogan_lightning.methods.autoencoder import AutoEncoder
    from anogan_lightning.train import TrainingIncomplete

    monkeypatch.setattr(AutoEncoder, "training_complete", lambda self: False)
    monkeypatch.setattr(AutoEncoder, "incomplete_reason", lambda self: "stage 2 never ran")
    with pytest.raises(TrainingIncomplete, match="stage 2 never ran; no AUROC reported"):
        run(compose_cfg(tiny_overrides("autoencoder"), tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "incomplete" and results["reason"] == "stage 2 never ran"
    assert not any("auroc" in k for k in results) and results["train/epochs"] == 1
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "scores.csv").exists()
    assert read_finished(tmp_path)["status"] == "incomplete"  # skip_finished: not retrained
    assert report.load_run(tmp_path)["status"] == "incomplete"
    assert report.load_run(tmp_path)["reason"] == "incomplete: stage 2 never ran"


def test_a_network_that_cannot_take_the_size_says_so(tmp_path: Path):
    overrides = [o for o in tiny_overrides("anogan") if not o.startswith("data.image_size")]
    with pytest.raises(
        ValueError, match=r"cannot build method .*AnoGAN \(data.image_size=48\).*power of two"
    ):
        run(compose_cfg([*overrides, "data.image_size=48"], tmp_path))


# -- splits that cannot be scored, test sets checked before training, W&B -------------------------
def test_a_one_class_test_split_is_not_scored_and_the_run_fails_after_its_files(
    tmp_path: Path, capsys
):
    """Only normal images (anomaly_fraction=0): no AUROC; results.json says not_scored and
    why, scores.csv is written, the table has a status line, and the run ends with one line."""
    cfg = compose_cfg([*tiny_overrides("autoencoder"), "data.anomaly_fraction=0"], tmp_path)
    with pytest.raises(SystemExit) as err:
        run(cfg)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("error: not scored: test: only normal")
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("val", "test"):
        assert results[f"{split}/status"] == "not_scored"
        assert results[f"{split}/reason"] == "only normal images (32): the AUROC needs both classes"
        assert f"{split}/auroc" not in results
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 1 + 32
    assert "| status | not_scored: only normal images (32)" in capsys.readouterr().out
    from anogan_lightning.artefacts import read_finished

    assert read_finished(tmp_path) is None  # a failed run: skip_finished reruns it
    extra_failed = {"test/auroc": 0.9, "test_duke/status": "not_scored", "test_duke/reason": "r"}
    (tmp_path / "results.json").write_text(json.dumps(extra_failed))
    assert read_finished(tmp_path) is None


def _bscan_folder(root: Path) -> None:
    """Kermany's layout: train/, val/, test/ with NORMAL and DME class folders of phantoms."""
    from test_bscan_windows import save, scan

    for offset, (split, n) in enumerate((("train", 4), ("val", 2), ("test", 2))):
        for k in range(n):
            seed = 10 * offset + k  # other scans in every split
            save(root / f"{split}/NORMAL/NORMAL-{k}-{split}.png", scan(seed=seed)[0])
            if split != "train":
                save(root / f"{split}/DME/DME-{k}-{split}.png", scan(seed=50 + seed, cyst=True)[0])


def _bscan_overrides(root: Path, cache: Path) -> list[str]:
    from test_bscan_windows import S

    overrides = [o for o in tiny_overrides("autoencoder") if not o.startswith("data.")]
    return overrides + [
        "data=bscan_folder",
        f"data.root={root}",
        f"data.image_size={S}",
        "data.retina.height=32",
        "data.retina.spacing_y_um=7.74",
        "data.window_stride=16",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=1",
        f"data.cache_dir={cache}",
    ]


def test_bscans_cut_off_by_a_batch_limit_are_left_out_and_counted(tmp_path: Path, capsys):
    """limit_test_batches stops inside the last test B-scan's windows: the test split is scored
    on its complete B-scans (partial), says how many were left out, and the run succeeds."""
    import warnings

    from hydra.utils import instantiate

    _bscan_folder(tmp_path / "scans")
    overrides = _bscan_overrides(tmp_path / "scans", tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = instantiate(compose_cfg(overrides, tmp_path / "x").data)
        dm.setup("test")
        counts, labels = dm.test_set.window_counts, dm.test_set.image_labels
        assert len(counts) == 4 and len(set(labels[:3].tolist())) == 2  # both classes first
        limit = int(counts[:3].sum()) + 1  # eval_batch_size=1: one window into B-scan 4
        cfg = compose_cfg([*overrides, f"++trainer.limit_test_batches={limit}"], tmp_path / "run")
        results = run(cfg)
    assert results["test/status"] == "partial" and results["test/dropped"] == 1
    assert results["test/reason"].startswith("1 of 4 B-scans left out")
    assert results["val/status"] == "ok" and "val/reason" not in results
    check_results_against_scores(tmp_path / "run", results)  # the metrics of the rows written
    rows = (tmp_path / "run/scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].split(",")[-3:] == ["thickness", "map_retina", "class"]
    assert "| status | ok | partial: 1 of 4 B-scans left out" in capsys.readouterr().out


def test_a_wrong_extra_test_root_stops_the_run_before_training(tmp_path: Path, monkeypatch):
    from anogan_lightning.data.bscan_folder import BScanFolderDataModule

    if not hasattr(BScanFolderDataModule, "check"):  # the data modules' own check() (issue 26)
        monkeypatch.setattr(
            BScanFolderDataModule, "check", lambda self: self.setup("test"), raising=False
        )
    _bscan_folder(tmp_path / "scans")
    overrides = _bscan_overrides(tmp_path / "scans", tmp_path / "cache")
    overrides += [f"+extra_test.duke.root={tmp_path / 'nowhere'}"]
    with pytest.raises(FileNotFoundError, match=r"extra_test\.duke: .*nowhere"):
        run(compose_cfg(overrides, tmp_path / "run"))
    assert not (tmp_path / "run/checkpoints").exists()  # stopped before the fit


def test_wandb_config_before_the_fit_and_the_model_artifact(tmp_path: Path, monkeypatch):
    """logger=wandb: the config is in the W&B run before training starts; wandb_model=true
    uploads checkpoints/model.ckpt as a model artifact."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import pytorch_lightning as pl

    seen = {}
    fit = pl.Trainer.fit

    def spy_fit(self, *args, **kwargs):
        seen["config_at_fit"] = dict(wandb.run.config).get("config", {}).get("seed")
        return fit(self, *args, **kwargs)

    def spy_artifact(self, artifact, *args, **kwargs):
        seen["artifact"] = (artifact.type, sorted(artifact.manifest.entries))

    monkeypatch.setattr(pl.Trainer, "fit", spy_fit)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log_artifact", spy_artifact)
    overrides = [*tiny_overrides("autoencoder"), "logger=wandb", "wandb_model=true", "seed=3"]
    run(compose_cfg(overrides, tmp_path))
    assert seen == {"config_at_fit": 3, "artifact": ("model", ["model.ckpt"])}
