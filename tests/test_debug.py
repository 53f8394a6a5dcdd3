"""Lightning's smoke test and the debug config group: ``++trainer.fast_dev_run=true`` runs every
method end to end with its own stage lengths (f-AnoGAN: one iteration of each stage), and
every ``debug=<option>`` composes to what its yaml says and runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, METHODS, compose_cfg, tiny_overrides
from omegaconf import OmegaConf

from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
EVAL_BATCH = 16  # data.eval_batch_size of the tiny overrides


def _own_stages(method: str) -> list[str]:
    """Tiny overrides, but the method's own stage lengths (f-AnoGAN's 4000 + 3000 iterations:
    a smoke test must not depend on shortened stages)."""
    stages = ("method.gan_steps", "method.encoder_steps")
    return [o for o in tiny_overrides(method) if not o.startswith(stages)]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", METHODS)
def test_fast_dev_run_runs_every_method_end_to_end(method: str, tmp_path: Path):
    results = run(compose_cfg([*_own_stages(method), "++trainer.fast_dev_run=true"], tmp_path))
    assert results.get("status") != "incomplete", results.get("reason")
    assert results["train/batches"] == 1  # one training batch
    assert math.isfinite(results["test/auroc"]) and math.isfinite(results["val/auroc"])
    assert len(_rows(tmp_path / "scores.csv")) == EVAL_BATCH  # one test batch
    ckpt = torch.load(tmp_path / "checkpoints/model.ckpt", map_location="cpu", weights_only=False)
    assert math.isfinite(float(ckpt["state_dict"]["threshold"]))
    if method == "fanogan":  # one GAN iteration, then one encoder iteration on the same batch
        assert int(ckpt["state_dict"]["gan_iterations"]) == 1
        assert int(ckpt["state_dict"]["iteration"]) == 2


@pytest.mark.parametrize("option", DEBUG)
def test_debug_options_compose(option: str, tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["+method=autoencoder", f"debug={option}"], return_hydra_config=True
        )
    assert cfg.hydra.runtime.choices.debug == option
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly is True
    assert cfg.data.num_workers == 0
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]  # ${now:} unresolved
    assert run_dir.startswith("${paths.log_dir}/debug/")  # apart from real runs
    expected = {
        "default": {"max_epochs": 1},
        "fast_dev_run": {"fast_dev_run": True},
        "overfit": {"overfit_batches": 3, "max_epochs": 20},
        "limit": {"limit_train_batches": 10, "limit_val_batches": 5, "limit_test_batches": 5},
    }[option]
    assert {k: cfg.trainer[k] for k in expected} == expected


def test_debug_limit_cuts_every_stage(tmp_path: Path):
    """debug=limit: 2 epochs of 10 training batches, 5 test batches scored."""
    tiny = [o for o in tiny_overrides("autoencoder") if not o.startswith("trainer.max_epochs")]
    overrides = [*tiny, "data.n_train=256", "data.n_test=128"]
    results = run(compose_cfg([*overrides, "debug=limit"], tmp_path))
    assert results["train/epochs"] == 2 and results["train/batches"] == 20
    assert len(_rows(tmp_path / "scores.csv")) == 5 * EVAL_BATCH
