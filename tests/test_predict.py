"""predict on OCT volumes: a data=oct_volume checkpoint scores volume files B-scan by B-scan as
its test volumes were scored; unreadable, malformed and unsupported files are rows, not crashes."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_cfg, tiny_overrides, train_retina_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from anogan_lightning.data.synthetic_volume import SPACING_UM, make_volume
from anogan_lightning.predict import predict
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N_BSCANS = 6  # B-scans of the volumes written here (the training volumes have 16)


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory) -> Path:
    """A seconds-long auto-encoder on the built-in synthetic volumes (32-px patches)."""
    tmp = tmp_path_factory.mktemp("volume")
    overrides = [
        o for o in tiny_overrides("autoencoder") if not o.startswith(("data.n_", "data.image"))
    ]
    overrides += [
        "data=oct_volume",
        f"data.cache_dir={tmp / 'cache'}",
        "data.synthetic_train=2",
        "data.synthetic_test=4",
        "data.image_size=32",
        "data.crop_height=48",
        "data.train_patches_per_bscan=2",
    ]
    run(compose_cfg(overrides, tmp / "run"))
    return tmp / "run"


def _predict(run_dir: Path, inp: Path | str, out: Path, *overrides: str, model=None) -> Path:
    """predict with the run's model.ckpt, or ``model`` (e.g. an exported file)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                f"ckpt={model or run_dir / 'checkpoints/model.ckpt'}",
                f"input={inp}",
                f"output_dir={out}",
                *overrides,
            ],
        )
    return predict(cfg)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _threshold(run_dir: Path) -> float:
    ckpt = torch.load(run_dir / "checkpoints/model.ckpt", map_location="cpu", weights_only=False)
    return float(ckpt["state_dict"]["threshold"])


def _write_volume(path: Path, index: int, diseased: bool) -> np.ndarray:
    vol = make_volume(5, "test", index, diseased, shape=(N_BSCANS, 128, 256))
    np.save(path, vol.volume)  # .npy: no spacing in the file
    return vol.mask


def test_folder_of_volumes_with_a_corrupt_one(volume_run: Path, tmp_path: Path, caplog):
    from PIL import Image

    scans = tmp_path / "scans"
    (scans / "masks").mkdir(parents=True)
    for i in (0, 1):
        mask = _write_volume(scans / f"vol_{i}.npy", i, diseased=i == 1)
        np.save(scans / "masks" / f"vol_{i}.npy", mask)  # annotations: left out
    (scans / "broken.npy").write_bytes(b"\x93NUMPY not really an array")
    np.save(scans / "four_d.npy", np.zeros((2, 2, 8, 8), np.uint8))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(scans / "scan.png")
    out = tmp_path / "pred"
    _predict(
        volume_run,
        scans,
        out,
        "batch_size=7",  # batches cross B-scan boundaries
        "max_bscan_heatmaps=2",
        f"spacing_x_um={SPACING_UM[2]}",
    )

    rows = {Path(r["path"]).name: r for r in _rows(out / "predictions.csv")}
    assert set(rows) == {"vol_0.npy", "vol_1.npy", "broken.npy", "four_d.npy", "scan.png"}
    bad = rows["broken.npy"]
    assert bad["status"] == "unreadable" and "broken.npy" in bad["error"] and not bad["score"]
    assert rows["four_d.npy"]["status"] == "unreadable" and "3-D" in rows["four_d.npy"]["error"]
    png = rows["scan.png"]
    assert png["status"] == "unsupported" and png["kind"] == "image"
    assert "oct_volume" in png["error"]
    assert "skipping unreadable volume" in caplog.text and "broken.npy" in caplog.text

    thr = _threshold(volume_run)
    bscans = _rows(out / "bscans.csv")
    assert len(bscans) == 2 * N_BSCANS
    for name in ("vol_0.npy", "vol_1.npy"):
        vol = rows[name]
        mine = [b for b in bscans if Path(b["path"]).name == name]
        assert vol["status"] == "ok" and vol["kind"] == "volume" and not vol["error"]
        assert int(vol["bscans"]) == N_BSCANS and float(vol["threshold"]) == pytest.approx(thr)
        assert [int(b["bscan"]) for b in mine] == list(range(N_BSCANS))
        scores = [float(b["score"]) for b in mine]
        assert all(np.isfinite(scores)) and float(vol["score"]) == pytest.approx(max(scores))
        assert vol["l1"] and vol["latent"]  # the max patch's score components
        for b in mine:  # each B-scan decided by the rule, at the checkpoint's threshold
            assert int(b["anomalous"]) == int(float(b["score"]) >= thr)
            assert (int(b["anomalous_patches"]) > 0) == (b["anomalous"] == "1")
            assert 0 <= int(b["anomalous_patches"]) <= int(b["patches"])
        assert int(vol["anomalous"]) == int(max(scores) >= thr)
        assert int(vol["anomalous_bscans"]) == sum(int(b["anomalous"]) for b in mine)
        assert int(vol["patches"]) == sum(int(b["patches"]) for b in mine) > 0
        assert int(vol["anomalous_patches"]) == sum(int(b["anomalous_patches"]) for b in mine)
        # heatmaps: capped at 2 per volume, the two highest-scoring B-scans
        (folder,) = (out / "heatmaps").glob(f"*_{Path(name).stem}")
        top = sorted(mine, key=lambda b: -float(b["score"]))[:2]
        pngs = sorted(folder.glob("*.png"))
        assert [p.name for p in pngs] == sorted(f"bscan_{int(b['bscan']):03d}.png" for b in top)
        assert {b["heatmap"] for b in mine} - {""} == {str(p.relative_to(out)) for p in pngs}
    assert not list(out.glob(".scratch-*"))  # prepared volumes are deleted


def test_volume_scores_match_the_training_runs_test_patches(volume_run: Path, tmp_path: Path):
    """The run's own test volume through predict: per-B-scan max of its scores.csv patches."""
    patches: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _rows(volume_run / "scores.csv"):
        path, b, _, _ = r["id"].rsplit(":", 3)  # "<volume file>:b<B-scan>:y<row>:x<col>"
        patches[path][int(b[1:])].append(float(r["score"]))
    volume = sorted(patches)[0]
    out = tmp_path / "pred"
    _predict(volume_run, volume, out, "heatmaps=false")
    bscans = _rows(out / "bscans.csv")
    assert [int(b["bscan"]) for b in bscans] == sorted(patches[volume]) == list(range(16))
    for b in bscans:
        mine = patches[volume][int(b["bscan"])]
        assert int(b["patches"]) == len(mine) and b["heatmap"] == ""
        assert float(b["score"]) == pytest.approx(max(mine), rel=1e-5, abs=1e-7)
    assert not (out / "heatmaps").exists()

    # a threshold among the B-scan scores: both decisions, each by the rule
    scores = sorted(float(b["score"]) for b in bscans)
    t = (scores[7] + scores[8]) / 2
    out = tmp_path / "again"
    _predict(volume_run, volume, out, "heatmaps=false", f"threshold={t}")
    again = _rows(out / "bscans.csv")
    flags = [int(b["anomalous"]) for b in again]
    assert flags == [int(float(b["score"]) >= t) for b in again] and sum(flags) == 8
    assert all(
        (int(b["anomalous_patches"]) > 0) == bool(f) for b, f in zip(again, flags, strict=True)
    )
    (vol,) = _rows(out / "predictions.csv")
    assert vol["anomalous"] == "1" and vol["anomalous_bscans"] == "8"
    assert float(vol["threshold"]) == pytest.approx(t)


def test_exported_volume_model_scores_as_its_checkpoint(volume_run: Path, tmp_path: Path):
    """An exported scorer of a data=oct_volume run: the same volume preprocessing (from the
    sidecar), the same B-scan scores and decisions; no component columns."""
    from anogan_lightning.export import export

    scans = tmp_path / "scans"
    scans.mkdir()
    _write_volume(scans / "vol.npy", 1, diseased=True)
    pt = export(volume_run / "checkpoints/model.ckpt", "torchscript", tmp_path / "model.pt")
    spacing = f"spacing_x_um={SPACING_UM[2]}"
    _predict(volume_run, scans, tmp_path / "ckpt", spacing, "heatmaps=false")
    _predict(volume_run, scans, tmp_path / "pt", spacing, "heatmaps=false", model=pt)
    (a,), (b,) = _rows(tmp_path / "pt/predictions.csv"), _rows(tmp_path / "ckpt/predictions.csv")
    assert a["status"] == b["status"] == "ok" and a["kind"] == "volume"
    assert set(b) - set(a) == {"l1", "latent"} and set(a) <= set(b)
    for key in ("bscans", "anomalous_bscans", "patches", "anomalous_patches", "anomalous"):
        assert a[key] == b[key], key
    assert float(a["threshold"]) == pytest.approx(_threshold(volume_run))
    rows_a, rows_b = _rows(tmp_path / "pt/bscans.csv"), _rows(tmp_path / "ckpt/bscans.csv")
    assert len(rows_a) == len(rows_b) == N_BSCANS
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["bscan"] == rb["bscan"] and ra["anomalous"] == rb["anomalous"]
        assert float(ra["score"]) == pytest.approx(float(rb["score"]), rel=1e-5, abs=1e-4)


def test_volume_without_spacing_is_reported(volume_run: Path, tmp_path: Path):
    """A .npy volume carries no column spacing; the row says which setting supplies it."""
    _write_volume(tmp_path / "vol.npy", 0, diseased=False)
    _predict(volume_run, tmp_path / "vol.npy", tmp_path / "pred")
    (row,) = _rows(tmp_path / "pred/predictions.csv")
    assert row["status"] == "unreadable" and "vol.npy" in row["error"]
    assert "spacing_x_um=" in row["error"]
    assert _rows(tmp_path / "pred/bscans.csv") == []


def test_2d_checkpoint_reports_volume_files_as_unsupported(tmp_path: Path):
    from PIL import Image

    from anogan_lightning.data.synthetic import make_split

    run_dir = tmp_path / "train"
    run(compose_cfg(tiny_overrides("autoencoder"), run_dir))
    scans = tmp_path / "scans"
    scans.mkdir()
    _write_volume(scans / "vol.npy", 0, diseased=False)
    img = ((make_split(1, 64, "test", seed=3).images[0, 0].numpy() + 1) * 127.5).round()
    Image.fromarray(img.astype(np.uint8)).save(scans / "scan.png")
    out = tmp_path / "pred"
    _predict(run_dir, scans, out)
    rows = {Path(r["path"]).name: r for r in _rows(out / "predictions.csv")}
    vol, png = rows["vol.npy"], rows["scan.png"]
    assert vol["status"] == "unsupported" and vol["kind"] == "volume" and not vol["score"]
    assert "data=oct_volume" in vol["error"]
    assert png["status"] == "ok" and png["kind"] == "image" and png["anomalous"] in ("0", "1")
    assert not (out / "bscans.csv").exists()
    assert [p.name for p in (out / "heatmaps").glob("*.png")] == ["000000_scan.png"]


@pytest.mark.parametrize("rule", ["topk", "map_retina"])
def test_retina_checkpoint_scores_whole_scans_as_its_test_run(tmp_path: Path, rule: str):
    """A resize=retina checkpoint: predict normalises each scan with the checkpoint's settings,
    scores every window and aggregates them by its rule, so a B-scan's score is the training
    run's test score of it; the stitched band map is the heatmap; a scan whose retina is not
    found is reported unreadable with the reason."""
    from PIL import Image

    run_dir, root = train_retina_run(tmp_path, rule)
    expected = {Path(r["id"]).name: float(r["score"]) for r in _rows(run_dir / "scores.csv")}
    Image.fromarray(np.full((248, 384), 90, np.uint8)).save(root / "test/blank.png")
    out = tmp_path / "pred"
    _predict(run_dir, root / "test", out, "batch_size=3")
    rows = {Path(r["path"]).name: r for r in _rows(out / "predictions.csv")}
    assert set(rows) == set(expected) | {"blank.png"}
    for name, score in expected.items():
        assert rows[name]["status"] == "ok"
        assert float(rows[name]["score"]) == pytest.approx(score, rel=1e-5), name
        assert int(rows[name]["patches"]) > 1  # windows across the whole band
    assert rows["blank.png"]["status"] == "unreadable" and "blank.png" in rows["blank.png"]["error"]
    assert len(list((out / "heatmaps").glob("*.png"))) == len(expected)
