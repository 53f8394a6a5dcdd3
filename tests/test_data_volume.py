"""OCTVolumeDataModule: batch contract, mask -> patch labels, cache hits and rebuilds, folder
layout and bad input, config."""

from __future__ import annotations

import inspect
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anogan_lightning.data import volume_cache
from anogan_lightning.data.oct_volume import OCTVolumeDataModule
from anogan_lightning.data.patch_dataset import PatchDataset
from anogan_lightning.data.readers import read_volume
from anogan_lightning.data.synthetic_volume import make_volume, render_volume

REPO = Path(__file__).resolve().parents[1]
S = 32
ID = re.compile(r"^.+\.(npz|npy):b\d+:y\d+:x\d+$")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> OCTVolumeDataModule:
    """Built-in synthetic volumes: 3 train, 4 test (2 of them held out for val)."""
    dm = OCTVolumeDataModule(
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        image_size=S,
        synthetic_train=3,
        synthetic_test=4,
        batch_size=16,
    )
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_batches_follow_the_contract(synth: OCTVolumeDataModule):
    for name in ("train", "val", "test"):
        loader = getattr(synth, f"{name}_dataloader")()
        batch = next(iter(loader))
        b = len(batch["id"])
        assert b == 16
        assert batch["x"].shape == (b, 1, S, S) and batch["x"].dtype == torch.float32
        assert -1.0 <= batch["x"].min() < batch["x"].max() <= 1.0
        assert batch["label"].shape == (b,) and batch["label"].dtype == torch.int64
        assert all(isinstance(i, str) and ID.match(i) for i in batch["id"]), batch["id"][:2]
        assert batch["coords"].shape == (b, 3) and batch["coords"].dtype == torch.int64
        if name == "train":
            assert "mask" not in batch and batch["label"].sum() == 0
            assert "/train/" in batch["id"][0]
        else:
            assert batch["mask"].shape == (b, 1, S, S) and batch["mask"].dtype == torch.float32
            assert "/test/" in batch["id"][0]
    summary = synth.split_summary()
    assert summary["train"] == {"normal": 3 * 16 * 8, "anomalous": 0}
    for name in ("val", "test"):
        assert summary[name]["anomalous"] > 0 and summary[name]["normal"] > 0
    assert len(synth.train_dataloader()) == 3 * 16 * 8 // 16  # drop_last, full batches only


def test_items_and_ids_point_at_their_pixels(synth: OCTVolumeDataModule):
    ds = synth.test_set
    item = ds[5]
    assert item["x"].shape == (1, S, S) and isinstance(item["label"], int)
    image, y, x = item["coords"].tolist()
    assert item["id"] == f"{ds.image_ids[image]}:y{y}:x{x}"
    band = ds.image(image)
    np.testing.assert_allclose(item["x"][0].numpy(), band[y : y + S, x : x + S], atol=1e-6)
    mask = ds.image_mask(image)
    np.testing.assert_array_equal(item["mask"][0].numpy(), mask[y : y + S, x : x + S])
    assert tuple(ds.image_shapes[image]) == band.shape == (64, 134)  # 256 cols at 11.5 -> 22 µm


def test_patch_labels_come_from_masks(synth: OCTVolumeDataModule):
    for ds in (synth.val_set, synth.test_set):
        batch = ds[np.arange(len(ds))]
        from_mask = batch["mask"].flatten(1).amax(1).long()
        assert torch.equal(batch["label"], from_mask)
        assert torch.equal(ds.labels, from_mask)
        vols = {v["path"]: v["label"] for v in ds.volumes}
        assert sorted(vols.values()) == [0, 1]  # val and test: one healthy, one diseased each
        for i in range(len(ds)):  # patches of healthy volumes are all normal
            if vols[ds.patch_id(i).split(":b")[0]] == 0:
                assert ds.labels[i] == 0


def test_dataset_pickles_without_its_data(synth: OCTVolumeDataModule):
    ds = synth.train_set
    _ = ds[[0, 1]]  # opens the memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000 < ds._arrays()[0].nbytes  # workers reopen the file
    again = pickle.loads(blob)
    assert torch.equal(again[[3, 7]]["x"], ds[[3, 7]]["x"])


# ---------------------------------------------------------------- cache


def _write_root(root: Path, n_train: int = 2, n_test: int = 2, spacing: bool = True) -> Path:
    """Small volumes (4 B-scans) as .npz (with spacing) or .npy (without); test masks .npy."""
    (root / "train").mkdir(parents=True)
    (root / "test" / "masks").mkdir(parents=True)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            rng = np.random.default_rng([7, i, split == "test"])
            lesions = ("fluid", "fluid") if split == "test" and i % 2 else ()
            v = render_volume(rng, (4, 128, 256), lesions)
            if spacing:
                np.savez(root / split / f"v{i}.npz", volume=v.volume, spacing=[120.0, 15.0, 11.5])
            else:
                np.save(root / split / f"v{i}.npy", v.volume)
            if split == "test":
                np.save(root / "test" / "masks" / f"v{i}.npy", v.mask)
    return root


def _dm(root: Path, cache: Path, **kw) -> OCTVolumeDataModule:
    kw = {"image_size": S, "val_volumes": 0, "batch_size": 8, **kw}
    return OCTVolumeDataModule(root=str(root), cache_dir=str(cache), **kw)


def test_cache_hit_skips_segmentation_and_changed_setting_rebuilds(tmp_path, monkeypatch):
    root = _write_root(tmp_path / "data")
    ready_before_read = []  # prepared volumes in the cache each time a volume file is read

    def read_and_count(path):
        ready_before_read.append(len(list((tmp_path / "cache" / "volumes").glob("[0-9a-f]*"))))
        return read_volume(path)

    monkeypatch.setattr(volume_cache, "read_volume", read_and_count)
    first = _dm(root, tmp_path / "cache")
    first.setup()
    assert ready_before_read == [0, 1, 2, 3]  # one volume at a time, each written before the next
    assert first.cache_stats == {
        "volumes_built": 4,
        "volumes_cached": 0,
        "splits_built": 3,
        "splits_cached": 0,
    }
    epoch1 = [b["x"] for b in first.train_dataloader()]
    epoch2 = [b["x"] for b in first.train_dataloader()]  # the second epoch reads the memmap
    assert len(epoch1) == len(epoch2) == 2 * 4 * 8 // 8  # every patch once per epoch
    torch.testing.assert_close(torch.cat(epoch1).sum(0), torch.cat(epoch2).sum(0))

    def no_segmentation(*args, **kwargs):
        raise AssertionError("segmentation ran on a cache hit")

    monkeypatch.setattr(volume_cache, "detect_boundaries", no_segmentation)
    second = _dm(root, tmp_path / "cache")  # a second run: everything from the cache
    second.setup()
    assert second.cache_stats["volumes_built"] == 0 and second.cache_stats["splits_built"] == 0
    for name in ("train", "val", "test"):
        a, b = getattr(first, f"{name}_set"), getattr(second, f"{name}_set")
        assert a.folder == b.folder and torch.equal(a.labels, b.labels)
    monkeypatch.undo()

    changed = _dm(root, tmp_path / "cache", below_bm=12)  # a preprocessing setting
    changed.setup()
    assert changed.cache_stats["volumes_built"] == 4
    assert changed.test_set.folder != first.test_set.folder
    patches = _dm(root, tmp_path / "cache", train_patches_per_bscan=3)  # a patch setting only
    patches.setup("fit")
    assert patches.cache_stats["volumes_built"] == 0 and len(patches.train_set) == 2 * 4 * 3

    touched = root / "train" / "v1.npz"  # a changed file: only that volume is prepared again
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = _dm(root, tmp_path / "cache")
    again.setup("fit")
    assert again.cache_stats["volumes_built"] == 1


def test_spacing_labels_csv_and_val_folder(tmp_path):
    root = _write_root(tmp_path / "data", n_test=3, spacing=False)
    with pytest.raises(ValueError, match=r"v0\.npy: the file carries no voxel spacing"):
        _dm(root, tmp_path / "cache").setup("fit")
    kept = _dm(root, tmp_path / "cache", target_spacing_x_um=None)  # no resampling
    kept.setup("test")
    assert tuple(kept.test_set.image_shapes[0]) == (64, 256)

    (root / "test" / "masks" / "v2.npy").unlink()
    with pytest.raises(ValueError, match=r"v2\.npy: no mask .* and no row in .*labels\.csv"):
        _dm(root, tmp_path / "cache", spacing_x_um=11.5).setup("test")
    (root / "test" / "labels.csv").write_text("file,label\nv2.npy,1\n")
    dm = _dm(root, tmp_path / "cache", spacing_x_um=11.5)
    dm.setup("test")
    assert "mask" not in dm.test_set[[0]]  # not every test volume has a mask
    by_volume = {v["path"]: v["label"] for v in dm.test_set.volumes}
    assert by_volume[str(root / "test" / "v2.npy")] == 1
    labels = dm.test_set.labels.numpy()
    from_v2 = np.array(["v2.npy" in dm.test_set.patch_id(i) for i in range(len(labels))])
    assert from_v2.any() and (labels[from_v2] == 1).all()  # the volume label, every patch

    (root / "val").mkdir()  # a val folder is used as it is
    for name in ("v0.npy", "v1.npy"):
        (root / "test" / name).rename(root / "val" / name)
    (root / "val" / "masks").mkdir()
    for name in ("v0.npy", "v1.npy"):
        (root / "test" / "masks" / name).rename(root / "val" / "masks" / name)
    dm = _dm(root, tmp_path / "cache", spacing_x_um=11.5, val_volumes=5)
    dm.setup("fit")
    assert sorted(Path(v["path"]).name for v in dm.val_set.volumes) == ["v0.npy", "v1.npy"]


def test_bad_layout_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _dm(missing, tmp_path / "cache").setup("fit")
    root = _write_root(tmp_path / "data", n_test=2)
    (root / "train" / "labels.csv").write_text("v1.npz,1\n")
    with pytest.raises(ValueError, match=r"v1\.npz: labelled 1 \(diseased\), but train/"):
        _dm(root, tmp_path / "cache").setup("fit")
    for p in (root / "train").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=f"{root / 'train'} holds no OCT volumes"):
        _dm(root, tmp_path / "cache").setup("fit")
    with pytest.raises(ValueError, match="val_volumes=2 leaves no test volume"):
        _dm(root, tmp_path / "cache", val_volumes=2).setup("test")
    with pytest.raises(ValueError, match="crop_height=32 must be >= image_size=64"):
        OCTVolumeDataModule(image_size=64, crop_height=32)
    with pytest.raises(ValueError, match="below_bm=64"):
        OCTVolumeDataModule(below_bm=64)


def test_synthetic_volumes_are_deterministic():
    a, b = make_volume(0, "test", 3, True), make_volume(0, "test", 3, True)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.mask, b.mask)
    assert a.lesions and a.mask.any() and a.volume.shape == (16, 128, 256)
    c = make_volume(0, "test", 4, False)
    assert not c.mask.any() and not np.array_equal(a.volume, c.volume)
    assert (a.ilm < a.bm).all() and a.ilm.shape == (16, 256)


# ---------------------------------------------------------------- config


def test_yaml_keys_are_constructor_args(tmp_path):
    cfg = OmegaConf.load(REPO / "anogan_lightning/conf/data/oct_volume.yaml")
    params = set(inspect.signature(OCTVolumeDataModule).parameters)
    assert set(cfg) - {"_target_"} == params
    assert cfg.root is None  # no root: the synthetic volumes
    dm = instantiate(cfg, cache_dir=str(tmp_path), seed=0)
    assert isinstance(dm, OCTVolumeDataModule)
    assert (dm.image_size, dm.settings.target_spacing_x_um, dm.settings.crop_height) == (
        64,
        22.0,
        64,
    )


def test_composes_with_the_train_config(tmp_path, synth: OCTVolumeDataModule):
    overrides = ["+method=anogan", "data=oct_volume", f"paths.log_dir={tmp_path}"]
    with initialize_config_dir(str(REPO / "anogan_lightning" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        assert cfg.data.cache_dir == f"{tmp_path}/cache/oct_volume"
        assert cfg.data.image_size == cfg.method.image_size == 64  # the data group's size
        overrides.append(f"data.image_size={S}")
        # the fixture's synthetic volumes and cache: composing must reach the same patches
        cfg = compose(
            "train",
            overrides=[
                *overrides,
                f"data.cache_dir={synth.cache_dir}",
                "data.synthetic_train=3",
                "data.synthetic_test=4",
                "data.batch_size=16",
            ],
        )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.cache_stats["volumes_built"] == 0 and dm.train_set.folder == synth.train_set.folder
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 1, S, S) and isinstance(dm.train_set, PatchDataset)


@pytest.mark.parametrize("method", ["anogan", "sparse_gan"])
def test_end_to_end_pixel_evaluation(tmp_path, method: str):
    """Synthetic volumes: patch maps (residual; Sparse-GAN's AAM) stitched into B-scans, pixel
    metrics, overlays."""
    from conftest import compose_cfg, tiny_overrides

    from anogan_lightning.train import run

    overrides = [o for o in tiny_overrides(method) if not o.startswith(("data.n_", "data.image"))]
    overrides += [
        "data=oct_volume",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic_train=2",
        "data.synthetic_test=4",
        "data.image_size=32",
        "data.crop_height=48",
        "data.train_patches_per_bscan=2",
        "figures=true",
    ]
    results = run(compose_cfg(overrides, tmp_path / "run"))
    assert 0 <= results["test/pixel_auroc"] <= 1 and results["test/pixel_lesion_count"] > 0
    assert 0 <= results["test/pixel_best_dice"] <= 1
    overlays = list((tmp_path / "run/bscans").glob("bscan_*.png"))
    assert 0 < len(overlays) <= 8
