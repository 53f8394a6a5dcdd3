"""Maps on the scan and volumes through a B-scan model (issue 25): a band map carried back onto
the B-scan's pixel grid, unreliable columns, given boundaries, volume layers, and predict
scoring a volume B-scan by B-scan with an en-face map; pixel metrics in scan coordinates."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, train_retina_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_bscan_preprocess import phantom, settings

from anogan_lightning.data.readers import VolumeReadError, read_volume
from anogan_lightning.data.retina.normalize import normalize_bscan
from anogan_lightning.data.retina.segment import RetinaNotFoundError
from anogan_lightning.predict import predict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_band_map_goes_back_onto_the_scan():
    """to_scan inverts the flattening, crop and resampling: a mask taken onto the band and back
    overlaps the original; a constant band map is that constant over the band's rows and NaN
    above and below; a padded (window-wide) map gives the same."""
    img, ilm, bm = phantom(bump=25)
    r = normalize_bscan(img, settings(height=64, x_scale=0.25))
    assert r.scan_shape == img.shape and r.boundaries == "detected"
    rows = np.arange(img.shape[0])[:, None]
    lesion = ((rows > bm - 40) & (rows < bm - 20) & (np.arange(img.shape[1]) > 300)).astype(
        np.uint8
    )
    back = r.to_scan(r.apply(lesion).astype(np.float32))
    assert back.shape == img.shape
    hit = back >= 0.5
    assert (hit & (lesion > 0)).sum() / (hit | (lesion > 0)).sum() > 0.8  # IoU
    const = r.to_scan(np.full(r.band.shape, 2.0, np.float32))
    inside = np.isfinite(const)
    assert np.allclose(const[inside], 2.0)
    for c in (0, 200, 500, 767):  # NaN above and below the band, the retina inside it
        col = inside[:, c]
        assert not col[0] and not col[-1] and col[int(ilm[c]) : int(bm[c])].all()
    wide = np.pad(r.band, ((0, 0), (5, 6)), constant_values=-1.0)
    assert np.array_equal(r.to_scan(wide), r.to_scan(r.band), equal_nan=True)
    with pytest.raises(ValueError, match="band map"):
        r.to_scan(r.band[:10])


def test_unreliable_columns_and_given_boundaries():
    """Columns whose ILM-BM distance is implausible are unreliable; given boundaries (a
    device's segmentation) replace detection, NaN columns are interpolated, and none at all is
    refused."""
    img, ilm, bm = phantom()
    r = normalize_bscan(img, settings(), boundaries=(ilm, bm))
    assert r.boundaries == "given" and not r.unreliable_columns().any()
    assert np.allclose(r.ilm_in, ilm) and np.allclose(r.bm_in, bm)
    broken = ilm.copy()
    broken[100:160] = bm[100:160] - 3  # ILM collapsed onto BM over 60 columns
    holes = bm.copy()
    holes[400:420] = np.nan
    r2 = normalize_bscan(img, settings(), boundaries=(broken, holes))
    bad = r2.unreliable_columns()
    assert bad[100:160].all() and bad.sum() == 60
    assert np.isfinite(r2.bm_in).all()
    with pytest.raises(RetinaNotFoundError, match="no segmented column"):
        normalize_bscan(img, settings(), boundaries=(ilm, np.full_like(bm, np.nan)), name="x.vol")
    with pytest.raises(ValueError, match="boundaries of shape"):
        normalize_bscan(img, settings(), boundaries=(ilm[:10], bm[:10]))


def test_npz_volume_layers(tmp_path: Path):
    """An .npz volume's ilm/bm arrays are its layers (out-of-frame rows NaN); a layer of the
    wrong shape is an error naming the file."""
    vol = np.zeros((3, 40, 50), np.uint8)
    ilm, bm = np.full((3, 50), 10.0), np.full((3, 50), 30.0)
    bm[1, 7] = 1e30  # Heyex-style "unsegmented"
    np.savez(tmp_path / "v.npz", volume=vol, ilm=ilm, bm=bm)
    v = read_volume(tmp_path / "v.npz")
    assert set(v.layers) == {"ilm", "bm"} and np.isnan(v.layers["bm"][1, 7])
    assert read_volume(tmp_path / "v.npz").data.shape == (3, 40, 50)
    np.savez(tmp_path / "bad.npz", volume=vol, ilm=ilm[:, :10], bm=bm[:, :10])
    with pytest.raises(VolumeReadError, match="bad.npz.*layer 'ilm'"):
        read_volume(tmp_path / "bad.npz")
    np.save(tmp_path / "plain.npy", vol)
    assert read_volume(tmp_path / "plain.npy").layers == {}


@pytest.fixture(scope="module")
def retina_run(tmp_path_factory) -> tuple[Path, Path]:
    return train_retina_run(tmp_path_factory.mktemp("retina"), masks=True)


def _predict(run_dir: Path, inp, out: Path, *overrides: str) -> Path:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                f"ckpt={run_dir / 'checkpoints/model.ckpt'}",
                f"input={inp}",
                f"output_dir={out}",
                *overrides,
            ],
        )
    return predict(cfg)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_pixel_metrics_in_scan_coordinates(retina_run):
    """A masked test split reports the pixel AUROC on the scans' own pixel grid beside the
    band figure; on the phantom cysts they agree."""
    run_dir, _ = retina_run
    res = json.loads((run_dir / "results.json").read_text())
    band, scan = res["test/pixel_auroc"], res["test/pixel_auroc_scan"]
    assert 0.5 < scan <= 1.0 and abs(scan - band) < 0.05
    assert res["test/pixel_count_scan"] > res["test/pixel_count"]


def test_predict_writes_maps_on_the_scan(retina_run, tmp_path: Path):
    """Each B-scan's map as a float32 array of the scan's shape (NaN outside the band), named
    in predictions.csv, and the overlay at the scan's resolution."""
    from PIL import Image

    run_dir, root = retina_run
    out = tmp_path / "pred"
    _predict(run_dir, root / "test/DME", out)
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "ok" and r["unreliable_columns"] == "0"
        m = np.load(out / r["map"])
        shape = np.asarray(Image.open(r["path"])).shape
        assert m.shape == shape and m.dtype == np.float32
        assert np.isnan(m[0]).all() and np.isfinite(m).any() and np.nanmin(m) >= 0
    assert len(list((out / "heatmaps").glob("*.png"))) == 2
    _predict(run_dir, root / "test/DME", tmp_path / "nomaps", "maps=false", "heatmaps=false")
    assert not (tmp_path / "nomaps/maps").exists()
    assert all(r["map"] == "" for r in _rows(tmp_path / "nomaps/predictions.csv"))


def test_volume_through_a_bscan_checkpoint(retina_run, tmp_path: Path):
    """A volume given to a B-scan checkpoint is scored B-scan by B-scan exactly as the same
    B-scans given as files; a multi-page TIFF is a volume, not its first page; the file's own
    boundaries are used where it has them (recorded); an en-face map (B-scans x columns) is
    written beside the top B-scans' overlays."""
    import tifffile
    from PIL import Image

    run_dir, root = retina_run
    files = sorted((root / "test").rglob("*.png"))
    files = [f for f in files if "masks" not in f.parts]
    scans = np.stack([np.asarray(Image.open(f)) for f in files])
    vols = tmp_path / "vols"
    vols.mkdir()
    np.save(vols / "stack.npy", scans)
    tifffile.imwrite(vols / "stack.tif", scans)
    out = tmp_path / "pred"
    _predict(run_dir, [*map(str, files), str(vols)], out, "max_bscan_heatmaps=2")
    rows = {Path(r["path"]).name: r for r in _rows(out / "predictions.csv")}
    bscans = _rows(out / "bscans.csv")
    for name in ("stack.npy", "stack.tif"):
        vol = rows[name]
        assert vol["status"] == "ok" and vol["kind"] == "volume", vol
        assert vol["bscans"] == str(len(files)) and vol["boundaries"] == "detected"
        mine = [b for b in bscans if Path(b["path"]).name == name]
        assert [int(b["bscan"]) for b in mine] == list(range(len(files)))
        for b, f in zip(mine, files, strict=True):
            assert float(b["score"]) == pytest.approx(float(rows[f.name]["score"]), rel=1e-6)
            assert b["boundaries"] == "detected" and b["anomalous"] == rows[f.name]["anomalous"]
        assert float(vol["score"]) == pytest.approx(max(float(b["score"]) for b in mine))
        assert int(vol["anomalous_bscans"]) == sum(b["anomalous"] == "1" for b in mine)
        enface = np.load(out / vol["map"])
        assert enface.shape == (len(files), scans.shape[2]) and np.isfinite(enface).mean() > 0.9
        folder = (out / vol["map"]).parent
        assert (folder / "enface.png").is_file()
        assert len(list(folder.glob("bscan_*.png"))) == 2
        assert sum(b["heatmap"] != "" for b in mine) == 2

    # the file's own boundaries: an .npz with ilm/bm layers (one B-scan unsegmented: detected)
    from anogan_lightning.data.retina.normalize import RetinaNorm

    s = RetinaNorm.from_dict(_retina_keys(run_dir))
    found = [normalize_bscan(a, s) for a in scans]
    ilm = np.stack([r.ilm_in for r in found])
    bm = np.stack([r.bm_in for r in found])
    ilm[1] = np.nan
    np.savez(tmp_path / "layers.npz", volume=scans, ilm=ilm, bm=bm)
    _predict(run_dir, tmp_path / "layers.npz", tmp_path / "pred2", "heatmaps=false")
    (vol,) = _rows(tmp_path / "pred2/predictions.csv")
    assert vol["status"] == "ok" and vol["boundaries"] == "file"
    mine = _rows(tmp_path / "pred2/bscans.csv")
    assert [b["boundaries"] for b in mine] == ["file", "detected"] + ["file"] * (len(files) - 2)
    assert (tmp_path / "pred2/heatmaps/000000_layers/enface.npy").is_file()


def _retina_keys(run_dir: Path) -> dict:
    import torch

    ckpt = torch.load(run_dir / "checkpoints/model.ckpt", map_location="cpu", weights_only=False)
    return ckpt["anogan_lightning"]["preprocessing"]["retina"]
