"""Every method in conf/method/*.yaml: gradients, loss on a fixed batch, fit + test through the
entry point on tiny synthetic data, artefacts, and loading the checkpoint without a config."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    FIXED_BATCH_LOSS,
    METHODS,
    check_results_against_scores,
    compose_cfg,
    read_scores,
    tiny_overrides,
)
from torch.utils.data import DataLoader

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """One tiny fit + test per method, shared by the tests below."""
    return {}


def _fit(method: str, cache: dict, tmp_path_factory) -> tuple[dict, Path]:
    if method not in cache:
        out = tmp_path_factory.mktemp(f"run_{method}")
        cfg = compose_cfg([*tiny_overrides(method), "figures=true"], out)
        cache[method] = (run(cfg), out)
    return cache[method]


@pytest.mark.parametrize("method", METHODS)
def test_fit_test_and_artefacts(method: str, fitted, tmp_path_factory):
    results, out = _fit(method, fitted, tmp_path_factory)
    check_results_against_scores(out, results)
    for split in ("val", "test"):
        for key in ("auroc", "ap", "sensitivity", "specificity", "precision", "recall"):
            assert 0 <= results[f"{split}/{key}"] <= 1, f"{split}/{key}"
    assert 0 <= results["test/pixel_auroc"] <= 1  # synthetic data has lesion masks
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["test/auroc"] == pytest.approx(results["test/auroc"])
    for name in ("scores.csv", "roc.png", "score_hist.png", "samples.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoints/model.ckpt").is_file()
    maps = sorted(p.name for p in (out / "anomaly_maps").glob("*.png"))
    assert maps[0] == "highest_1.png" and "lowest_1.png" in maps
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 and rows[0].startswith("id,label,score")


@pytest.mark.parametrize("method", METHODS)
def test_load_from_checkpoint_without_config(method: str, fitted, tmp_path_factory):
    results, out = _fit(method, fitted, tmp_path_factory)
    cfg = compose_cfg(tiny_overrides(method), out)
    cls = hydra.utils.get_class(cfg.method._target_)
    model = cls.load_from_checkpoint(out / "checkpoints/model.ckpt", map_location="cpu")
    assert float(model.threshold) == pytest.approx(results["val/youden_threshold"])
    fresh = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert set(model.state_dict()) == set(fresh.state_dict())
    # the checkpoint alone scores the run's first test batch as the run did (scores.csv)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    model.eval()
    with torch.inference_mode(not model.needs_grad_at_test):
        out_now = model.score(batch)
    ids, _, cols = read_scores(out)
    row = {id_: i for i, id_ in enumerate(ids)}
    idx = torch.tensor([row[str(i)] for i in batch["id"]])
    for name in ("score", *model.components):
        torch.testing.assert_close(out_now[name].double(), cols[name][idx], rtol=1e-6, atol=1e-7)


class _GradRecorder(pl.Callback):
    """Records which parameters received a non-zero gradient, and the tracked loss per step."""

    def __init__(self, model: pl.LightningModule, key: str) -> None:
        self.key = key
        self.losses: list[float] = []
        self.touched: set[str] = set()
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None and p.grad.abs().sum() > 0:
                self.touched.add(name)

        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics[self.key]))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_and_fixed_batch_loss(method: str, tmp_path: Path):
    pl.seed_everything(0)
    cfg = compose_cfg(tiny_overrides(method), tmp_path)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    batch = next(iter(DataLoader(make_split(16, 16, "train", seed=2), batch_size=16)))
    key = FIXED_BATCH_LOSS.get(method, "train/loss")
    recorder = _GradRecorder(model, key)
    steps = 30
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(model, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    untouched = {n for n, p in model.named_parameters() if p.requires_grad} - recorder.touched
    assert not untouched, f"parameters without a gradient: {sorted(untouched)}"
    first, last = recorder.losses[:3], recorder.losses[-3:]
    assert sum(last) < sum(first), f"{key}: {recorder.losses}"
