"""Shared fixtures: config composition with tiny overrides, paths to the repo and shared data."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from anogan_lightning import available_methods, method_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "anogan_lightning" / "conf"
MINI = REPO.parent / "shared/data/kermany-mini"
METHODS = available_methods()

# `make test` runs pytest-xdist workers, one per core: each computes on one thread, and so do
# the subprocesses it starts (the environment), since workers at torch's default of one thread
# per core would oversubscribe the cores, and OpenMP's spinning threads make that several times
# slower. tests/test_reproducibility.py removes the setting for its runs at the default count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Tiny settings for any method: applied to the keys a method's config has, so a new
# conf/method/*.yaml runs through the same tests without a new test.
TINY_METHOD = {
    "width": 8,
    "latent_dim": 16,
    "mapping_steps": 3,
    "progress": False,
    "gan_steps": 0,  # fanogan: the generic tests run stage 2 alone (test_fanogan.py: stage 1)
    "encoder_steps": 64,
}
# The logged training loss that a few steps on one fixed batch must lower (test_methods.py), per
# method; "train/loss" for a method not listed.
FIXED_BATCH_LOSS = {
    "anogan": "train/loss_d",  # D learns to tell one fixed batch from fakes
    "ganr": "train/loss_d",
    "acae": "train/loss_rec",  # the autoencoder learns to reconstruct one batch
    "fanogan": "train/loss_e",  # izi_f through the frozen G (stage 2 alone: gan_steps=0 above)
    "pix2pix_image": "train/loss_re",  # G learns to reconstruct one fixed batch
    "pix2pix_latent": "train/loss_re",
    "sparse_gan": "train/loss_re",
}
TINY_DATA = [
    "data.n_train=64",
    "data.n_val=32",
    "data.n_test=32",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "trainer.max_epochs=1",
    "logger=csv",
    "~callbacks.progress_bar",
    "figures=false",  # the figures take most of a tiny run; the tests of artefacts turn them on
]


def tiny_overrides(method: str, image_size: int = 16) -> list[str]:
    """Overrides for a seconds-long fit + test of ``method`` on synthetic data."""
    keys = method_config(method)
    out = [f"+method={method}", *TINY_DATA, f"data.image_size={image_size}"]
    out += [f"method.{k}={v}" for k, v in TINY_METHOD.items() if k in keys]
    return out


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config as ``python -m anogan_lightning.train`` would build it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def read_scores(out_dir: Path) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """scores.csv of a run: (ids, labels (N,), {"score" and every component: (N,) float64})."""
    with open(out_dir / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [k for k in rows[0] if k not in ("id", "label", "class")]
    labels = torch.tensor([int(r["label"]) for r in rows])
    cols = {n: torch.tensor([float(r[n]) for r in rows], dtype=torch.float64) for n in names}
    return [r["id"] for r in rows], labels, cols


def check_results_against_scores(out_dir: Path, results: dict) -> None:
    """The test metrics a run reports are those of the per-image scores it wrote (scores.csv):
    the AUROC of the score and of every component, and accuracy and sensitivity at the
    threshold chosen on validation."""
    from anogan_lightning.evaluation import metrics

    _, labels, cols = read_scores(out_dir)
    for name, s in cols.items():
        key = "test/auroc" if name == "score" else f"test/auroc_{name}"
        assert results[key] == pytest.approx(metrics.auroc(s, labels), abs=1e-6), key
    pred = cols["score"] >= results["val/youden_threshold"]
    sick = labels == 1
    accuracy = float((pred == sick).double().mean())
    assert results["test/accuracy_at_val_threshold"] == pytest.approx(accuracy)
    assert results["test/sensitivity_at_val_threshold"] == pytest.approx(
        float(pred[sick].double().mean())
    )


@pytest.fixture
def needs_mini():
    if not MINI.is_dir():
        pytest.skip(f"kermany-mini sample not found at {MINI}")
    return MINI


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort, the rest in file order): with xdist workers the long
    ones then overlap each other and the short ones fill the gaps, instead of one long test
    starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def train_retina_run(
    tmp: Path, rule: str = "topk", masks: bool = False, extra: Sequence[str] = ()
) -> tuple[Path, Path]:
    """A seconds-long auto-encoder on phantom B-scans (``resize=retina``, 32-px windows 16
    apart on 32-row bands; tests/test_bscan_windows.py's phantoms): train/val/test NORMAL and
    DME folders under ``tmp/scans`` (DME scans have a dark cyst; ``masks=True`` writes its mask
    under ``masks/`` as the data layout does); ``extra``: more overrides. Returns (run dir,
    scans root)."""
    import warnings

    from test_bscan_windows import S, save, scan

    root = tmp / "scans"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for k in range(n):
            save(root / f"{split}/NORMAL/NORMAL-{k}-{split}.png", scan(seed=k + 10 * n)[0])
            if split != "train":
                img, mask = scan(seed=50 + k, cyst=True)
                save(root / f"{split}/DME/DME-{k}-{split}.png", img)
                if masks:
                    save(root / f"masks/{split}/DME/DME-{k}-{split}.png", mask * 255)
    overrides = [o for o in tiny_overrides("autoencoder") if not o.startswith("data.")]
    overrides += [
        "data=bscan_folder",
        "data.resize=retina",
        f"data.root={root}",
        f"data.image_size={S}",
        "data.retina.height=32",
        "data.retina.spacing_y_um=7.74",
        "data.window_stride=16",
        f"data.aggregate={rule}",
        "data.num_workers=0",
        "data.batch_size=4",
        f"data.cache_dir={tmp / 'cache'}",
        *(["data.mask_dir=masks"] if masks else []),
        *extra,
    ]
    from anogan_lightning.train import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(compose_cfg(overrides, tmp / "run"))
    return tmp / "run", root
