"""A run's test set of whole volumes for a B-scan model (issue 25): the volumes listed and
checked before training, scored volume by volume under ``test_<name>/`` with the scores that
``predict`` gives the same files, and bad sets refused with the path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, train_retina_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_bscan_windows import scan

from anogan_lightning.data.bscan_volumes import BScanVolumeTestSet
from anogan_lightning.predict import predict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_volumes(root: Path) -> None:
    """Two NORMAL and two DME phantom volumes (3 B-scans each; one B-scan of a DME volume has
    a cyst), as .npz files in class folders."""
    for k in range(2):
        normal = np.stack([scan(seed=100 + 3 * k + b)[0] for b in range(3)])
        sick = np.stack([scan(seed=200 + 3 * k + b, cyst=b == 1)[0] for b in range(3)])
        for cls, vol in (("NORMAL", normal), ("DME", sick)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            np.savez(root / cls / f"{cls.lower()}_{k}.npz", volume=vol)


def test_run_scores_volumes_like_predict(tmp_path: Path):
    vols = tmp_path / "volumes"
    write_volumes(vols)
    target = "anogan_lightning.data.bscan_volumes.BScanVolumeTestSet"
    run, _ = train_retina_run(
        tmp_path, extra=[f"+extra_test.vols._target_={target}", f"+extra_test.vols.root={vols}"]
    )
    res = json.loads((run / "results.json").read_text())
    assert res["test_vols/status"] == "ok"
    assert 0.0 <= res["test_vols/auroc"] <= 1.0 and "test_vols/auroc_ci_low" in res
    assert res["test_vols/bscans"] == 12
    assert res["data/test_vols_normal"] == 2 and res["data/test_vols_anomalous"] == 2
    with open(run / "scores_vols.csv", newline="") as fh:
        rows = {Path(r["id"]).name: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["dme_0.npz", "dme_1.npz", "normal_0.npz", "normal_1.npz"]
    assert rows["dme_0.npz"]["label"] == "1" and rows["normal_1.npz"]["class"] == "NORMAL"
    assert all(r["bscans"] == "3" for r in rows.values())
    # predict on the same files gives the same volume scores (its volume rule: max B-scan)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "predict",
            [
                f"ckpt={run / 'checkpoints/model.ckpt'}",
                f"input={vols}",
                f"output_dir={tmp_path / 'pred'}",
                "heatmaps=false",
            ],
        )
    with open(predict(cfg), newline="") as fh:
        pred = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    for name, r in rows.items():
        assert pred[name]["kind"] == "volume"
        assert float(pred[name]["score"]) == pytest.approx(float(r["score"]), rel=1e-6)


def test_bad_volume_sets_are_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BScanVolumeTestSet(str(tmp_path / "nowhere"), resize="retina").check()
    vols = tmp_path / "volumes"
    write_volumes(vols)
    with pytest.raises(ValueError, match="resize=retina model; this run's data has resize=crop"):
        BScanVolumeTestSet(str(vols), resize="crop").check()
    with pytest.raises(ValueError, match="resize=retina model"):
        BScanVolumeTestSet(str(vols)).check()  # data=synthetic has no resize key
    for f in (vols / "DME").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="only normal volumes"):
        BScanVolumeTestSet(str(vols), resize="retina").check()
    np.savez(vols / "loose.npz", volume=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="not in a class folder"):
        BScanVolumeTestSet(str(vols), resize="retina").check()
    (vols / "list.csv").write_text("path,label\nNORMAL/normal_0.npz,NORMAL\nDME/gone.npz,DME\n")
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        BScanVolumeTestSet(str(vols), csv="list.csv", resize="retina").check()
