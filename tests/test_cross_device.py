"""Cross-device evaluation as one run: ``extra_test`` test sets scored with the trained model
and the validation threshold, each under its own prefix, with its own scores_<name>.csv."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny_overrides
from test_bscan_windows import S, save, scan

from anogan_lightning import report
from anogan_lightning.evaluation import metrics
from anogan_lightning.train import run


def _scores(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return torch.tensor([int(r["label"]) for r in rows]), torch.tensor(
        [float(r["score"]) for r in rows], dtype=torch.float64
    )


@pytest.fixture
def sets(tmp_path: Path) -> Path:
    """train/: class folders with splits; other/: a CSV with masks (duke-like); third/: class
    folders without splits (mexico-like)."""
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for k in range(n):
            save(tmp_path / f"train/{split}/NORMAL/NORMAL-{k}-{split}.png", scan(seed=k)[0])
        if split != "train":
            for k in range(n):
                save(
                    tmp_path / f"train/{split}/DME/DME-{k}-{split}.png",
                    scan(seed=50 + k, cyst=True)[0],
                )
    rows = ["file,fluid,patient"]
    for k in range(4):
        img, mask = scan(seed=100 + k, cyst=k % 2 == 0)
        save(tmp_path / f"other/img/s{k}.png", img)
        save(tmp_path / f"other/masks/s{k}.png", mask * 255)
        rows.append(f"s{k}.png,{int(k % 2 == 0)},{k // 2}")
    (tmp_path / "other/list.csv").write_text("\n".join(rows) + "\n")
    for cls, cyst in (("NORMAL", False), ("DME", True)):
        for k in range(3):
            save(tmp_path / f"third/test/{cls}/{cls}-{k}.png", scan(seed=200 + k, cyst=cyst)[0])
    return tmp_path


def test_extra_test_sets_scored_under_their_prefixes(sets: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(sets)  # relative roots resolve against the directory the run starts in
    overrides = [o for o in tiny_overrides("autoencoder") if not o.startswith("data.")]
    overrides += [
        "data=bscan_folder",
        "data.resize=retina",
        "data.root=train",
        f"data.image_size={S}",
        "data.retina.height=32",
        "data.retina.spacing_y_um=7.74",
        "data.window_stride=16",
        "data.num_workers=0",
        "data.batch_size=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        # the extra sets set only what differs: window size, retina settings, stride inherited
        "+extra_test.other.root=other",
        "+extra_test.other.csv=list.csv",
        "+extra_test.other.path_column=file",
        "+extra_test.other.label_column=fluid",
        "+extra_test.other.group_column=patient",
        "+extra_test.other.image_dir=img",
        "+extra_test.other.mask_dir=masks",
        "+extra_test.other.pool_split=[0,0,1]",
        "+extra_test.other.val_fraction=0",
        "+extra_test.third.root=third",
        "+extra_test.third.val_fraction=0",
        "+extra_test.off=null",
        "figures=true",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(compose_cfg(overrides, tmp_path / "run"))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    threshold = results["val/youden_threshold"]
    for name, n, pixels in (("other", 4, True), ("third", 6, False)):
        labels, scores = _scores(out / f"scores_{name}.csv")
        assert len(labels) == n  # one row per B-scan: windows aggregated as in training's data
        auroc = metrics.auroc(scores, labels)
        assert saved[f"test_{name}/auroc"] == pytest.approx(auroc, abs=1e-6)
        acc = float(((scores >= threshold) == (labels == 1)).double().mean())
        assert saved[f"test_{name}/accuracy_at_val_threshold"] == pytest.approx(acc)
        assert (f"test_{name}/pixel_auroc" in saved) is pixels
        assert saved[f"data/test_{name}_anomalous"] == int(labels.sum())
    assert list((out / "bscans_other").glob("bscan_*.png"))
    assert not any(k.startswith("test_off/") for k in saved)
    # the run's own test split is untouched by the extra sets
    labels, scores = _scores(out / "scores.csv")
    assert len(labels) == 4
    assert saved["test/auroc"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-6)
    table = report.report([out])  # one column per extra set and metric
    head = next(line for line in table.splitlines() if "test_other/auroc" in line)
    assert "test_other/pixel_auroc" in head and "test_third/auroc" in head
    assert f"{saved['test_third/auroc']:.4f}" in table


def test_cross_device_experiment_composes_with_shared_roots(tmp_path: Path, monkeypatch):
    """conf/experiment/cross_device.yaml: every extra set instantiates over the Kermany data
    config, inherits its preprocessing, and its relative root is the shared folder when the
    run starts in a checkout beside ../shared."""
    from conftest import REPO
    from hydra.utils import instantiate

    from anogan_lightning.data.bscan_folder import BScanFolderDataModule
    from anogan_lightning.train import extra_test_configs

    cfg = compose_cfg(["+experiment=cross_device", "method=acae"], tmp_path)
    assert cfg.method._target_.endswith("ACAE") and set(cfg.extra_test) == {"duke", "mexico"}
    monkeypatch.chdir(REPO)
    for name, data_cfg in extra_test_configs(cfg).items():
        keys = cfg.extra_test[name]
        dm = instantiate(data_cfg)
        assert isinstance(dm, BScanFolderDataModule), name
        assert (dm.image_size, dm.preprocessing.resize) == (cfg.data.image_size, "retina")
        shared = REPO.parent / "shared/data"
        if shared.is_dir():
            assert Path(keys.root).resolve() == (shared / Path(keys.root).name).resolve()
            assert Path(keys.root).is_dir(), keys.root
