"""BScanPreprocessing: the one object that the data modules build, the checkpoint stores and
prediction rebuilds (round trip, config keys, validation, the datasets it builds), and the
window grid it shares with the volume patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anogan_lightning.data.bscan.crop import CropBScanDataset
from anogan_lightning.data.bscan.preprocessing import (
    BScanPreprocessing,
    preprocessing_from_checkpoint,
)
from anogan_lightning.data.bscan.retina_windows import RetinaBScanDataset
from anogan_lightning.data.bscan.windows import window_starts
from anogan_lightning.data.retina.normalize import RetinaNorm
from anogan_lightning.data.retina.patches import grid_patch_positions

OTHER = BScanPreprocessing(
    image_size=32,
    resize="crop",
    retina=RetinaNorm(height=48, flatten="smooth", intensity_percentiles=None, x_scale=0.25),
    crop_flatten=True,
    fill_white=False,
    window_stride=None,
    aggregate="map_retina",
    top_k=5,
    map_region="band",
)


@pytest.mark.parametrize("p", [BScanPreprocessing(), OTHER], ids=["defaults", "other"])
def test_round_trip_through_json(p: BScanPreprocessing):
    d = json.loads(json.dumps(p.to_dict()))  # JSON-safe: what a checkpoint or sidecar holds
    assert BScanPreprocessing.from_dict(d) == p
    assert d["retina"]["intensity_percentiles"] == (
        None if p.retina.intensity_percentiles is None else list(p.retina.intensity_percentiles)
    )


def test_from_dict_names_an_unknown_key():
    d = BScanPreprocessing().to_dict()
    with pytest.raises(ValueError, match="stride"):
        BScanPreprocessing.from_dict({**d, "stride": 8})
    with pytest.raises(ValueError, match="retina: .*heigth"):
        BScanPreprocessing.from_dict({**d, "retina": {"heigth": 64}})


def test_from_data_config_takes_its_keys_only():
    data = {
        "_target_": "anogan_lightning.data.kermany.KermanyDataModule",
        "root": "/data",
        "val_from": "train",
        "image_size": 32,
        "resize": "retina",
        "retina": {"height": 40, "intensity_percentiles": [2.0, 98.0]},
        "fill_white": False,
        "window_stride": 8,
        "aggregate": "max",
        "top_k": 2,
        "map_region": "band",
        "crop_flatten": True,
    }
    p = BScanPreprocessing.from_data_config(data)
    assert (p.image_size, p.resize, p.window_stride, p.aggregate, p.top_k) == (
        32,
        "retina",
        8,
        "max",
        2,
    )
    assert p.map_region == "band" and p.crop_flatten and not p.fill_white
    assert p.retina.height == 40 and p.retina.intensity_percentiles == (2.0, 98.0)
    assert not p.retina.fill_white  # follows fill_white ...
    keep = BScanPreprocessing.from_data_config({**data, "retina": {"fill_white": True}})
    assert keep.retina.fill_white  # ... unless the retina keys set it
    # a data module that makes its own square images (synthetic): whole images, crop
    synthetic = BScanPreprocessing.from_data_config({"image_size": 16, "n_train": 64})
    assert synthetic == BScanPreprocessing(image_size=16, resize="crop")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"resize": "stretch"}, "resize='stretch'"),
        ({"aggregate": "median"}, "aggregate='median'"),
        ({"map_region": "vitreous"}, "map_region='vitreous'"),
        ({"image_size": 0}, "image_size=0"),
        ({"top_k": 0}, "top_k=0"),
        ({"window_stride": 0}, "window_stride=0"),
        ({"image_size": 128}, "retina.height=64 < image_size=128"),
        ({"retina": {"height": 64}}, "a RetinaNorm"),
    ],
)
def test_invalid_settings_name_themselves(kw: dict, match: str):
    with pytest.raises(ValueError, match=match):
        BScanPreprocessing(**kw)


def test_crop_policy_allows_any_retina_height():
    assert BScanPreprocessing(image_size=224, resize="crop").image_size == 224


def test_checkpoint_record_wins_over_the_data_config():
    data = {"image_size": 32, "resize": "retina", "aggregate": "max"}
    assert preprocessing_from_checkpoint({"data": data}) == BScanPreprocessing.from_data_config(
        data
    )
    meta = {"data": data, "preprocessing": OTHER.to_dict()}
    assert preprocessing_from_checkpoint(meta) == OTHER
    assert preprocessing_from_checkpoint({"data": {}}).resize == "crop"  # no B-scan config


def test_datasets_by_policy(tmp_path: Path):
    from PIL import Image

    path = tmp_path / "scan.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None], (64, 2))).save(path)
    retina = BScanPreprocessing(image_size=32)
    ds = retina.train_dataset([path], [0], ["N"], None, "random", None)
    assert isinstance(ds, RetinaBScanDataset) and ds.mode == "random" and ds.aggregate is None
    ds = retina.eval_dataset([path], [0], ["N"], None, None)
    assert isinstance(ds, RetinaBScanDataset) and ds.mode == "grid" and ds.aggregate == "topk"
    assert ds.stride == 32 and ds.map_region == "retina"
    crop = BScanPreprocessing(image_size=32, resize="crop", crop_flatten=True, fill_white=False)
    ds = crop.train_dataset([path], [0], ["N"], None, "random", None)
    assert isinstance(ds, CropBScanDataset) and ds.crop == "random"
    assert (ds.resize, ds.flatten, ds.fill_white) == ("crop", True, False)
    ds = crop.eval_dataset([path], [0], ["N"], None, None)
    assert isinstance(ds, CropBScanDataset) and ds.crop == "center"
    assert ds.item(0)["x"].shape == (1, 32, 32)
    ds.paths[0] = tmp_path / "gone.png"
    with pytest.raises(FileNotFoundError):
        ds.item(0)  # item() raises; __getitem__ skips
    with pytest.warns(UserWarning, match="gone.png"):
        assert ds[0] is None
    assert ds.n_skipped == 1


def test_window_starts_cover_and_the_patch_grid_uses_them():
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(12, 4, 4).tolist() == [0, 4, 8]  # flush already
    assert window_starts(11, 4, 4).tolist() == [0, 4, 7]  # last one flush with the end
    assert window_starts(4, 4, 2).tolist() == [0] and window_starts(3, 4, 2).tolist() == [0]
    for length, size, stride in ((100, 16, 5), (64, 64, 8), (37, 8, 8)):
        s = window_starts(length, size, stride)
        covered = np.zeros(length, bool)
        for v in s:
            covered[v : v + size] = True
        assert covered.all() and s[-1] == max(0, length - size) and s.dtype == np.int64
    # the volume patch grid: every (y, x) of the starts over a band whose retina fills it
    w, h = 40, 24
    ilm, bm = np.zeros(w), np.full(w, h - 1.0)
    pos = grid_patch_positions(ilm, bm, h, 8, 6)
    ys, xs = window_starts(h, 8, 6), window_starts(w, 8, 6)
    assert pos.tolist() == [[y, x] for y in ys for x in xs]
    assert torch.as_tensor(pos).dtype == torch.int64


def test_predict_prefers_the_checkpoint_record(tmp_path: Path):
    """predict rebuilds the preprocessing from the checkpoint's ``preprocessing`` record when it
    has one (else from its data config): a record without the fill scores a scan with a white
    wedge otherwise; a record of another input size than the model's is an error."""
    import csv

    from conftest import CONF, compose_cfg, tiny_overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from PIL import Image

    from anogan_lightning.predict import load_checkpoint, predict
    from anogan_lightning.train import run

    run(compose_cfg(tiny_overrides("autoencoder"), tmp_path / "run"))
    ckpt = tmp_path / "run/checkpoints/model.ckpt"
    a = np.random.default_rng(0).integers(20, 120, (64, 96), dtype=np.uint8)
    a[:20, :30] = 255  # registration fill
    Image.fromarray(a).save(tmp_path / "scan.png")
    _, record = load_checkpoint(ckpt, torch.device("cpu"))
    from_data = preprocessing_from_checkpoint({"data": record["data"]})  # synthetic: crop
    assert from_data == BScanPreprocessing(image_size=16, resize="crop")

    def score(ckpt_path: Path, name: str) -> float:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose(
                "predict",
                overrides=[
                    f"ckpt={ckpt_path}",
                    f"input={tmp_path / 'scan.png'}",
                    f"output_dir={tmp_path / name}",
                    "heatmaps=false",
                ],
            )
        with open(predict(cfg), newline="") as fh:
            return float(next(csv.DictReader(fh))["score"])

    def with_record(p: BScanPreprocessing | None, name: str) -> Path:
        c = torch.load(ckpt, map_location="cpu", weights_only=False)
        c["anogan_lightning"].pop("preprocessing", None)
        if p is not None:
            c["anogan_lightning"]["preprocessing"] = p.to_dict()
        torch.save(c, tmp_path / name)
        return tmp_path / name

    plain = score(with_record(None, "plain.ckpt"), "plain")  # from the data config
    same = BScanPreprocessing(image_size=16, resize="crop")
    assert score(with_record(same, "same.ckpt"), "same") == plain
    unfilled = BScanPreprocessing(image_size=16, resize="crop", fill_white=False)
    assert score(with_record(unfilled, "unfilled.ckpt"), "unfilled") != plain
    wrong = with_record(BScanPreprocessing(image_size=32, resize="crop"), "wrong.ckpt")
    with pytest.raises(ValueError, match="16-px inputs, its preprocessing 32"):
        score(wrong, "wrong")
