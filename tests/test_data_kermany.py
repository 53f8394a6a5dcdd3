"""KermanyDataModule (the crop policy): protocol splits on kermany-mini, bad input on tiny
folders, the resize policy and its reader."""

from __future__ import annotations

import inspect
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from anogan_lightning.data.base import collate_skip_none
from anogan_lightning.data.bscan.crop import CropBScanDataset
from anogan_lightning.data.bscan.io import read_image
from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing
from anogan_lightning.data.bscan_folder import BScanFolderDataModule
from anogan_lightning.data.kermany import KermanyDataModule, list_split
from anogan_lightning.data.splits import patient_id, split_by_patient
from anogan_lightning.data.transforms import (
    crop_square,
    fit_height,
    pad_width,
    squash,
    to_unit_range,
)

REPO = Path(__file__).resolve().parents[1]


def compose_data(name: str):
    """The ``data`` node of the training config with ``data=<name>`` (defaults lists resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "anogan_lightning/conf"), version_base="1.3"):
        return compose("train", overrides=[f"data={name}"]).data


MINI = Path(__file__).resolve().parents[2] / "shared/data/kermany-mini"
needs_mini = pytest.mark.skipif(
    not MINI.is_dir(), reason=f"kermany-mini sample not found at {MINI}"
)
S = 32
CROP = BScanPreprocessing(image_size=S, resize="crop")  # the whole-image policy


def kermany(root: Path | str, **kw) -> KermanyDataModule:
    """The module with the crop policy at image_size S, loading in this process, no cache."""
    args = {"image_size": S, "resize": "crop", "num_workers": 0, "cache_dir": None}
    return KermanyDataModule(str(root), **{**args, **kw})


def read(path: Path, size: int = 64, flatten: bool = False, fill_white: bool = True):
    """read_image with the crop policy; fill on, flattening off unless asked."""
    return read_image(path, size, "crop", flatten, fill_white)


# ---------------------------------------------------------------- kermany-mini


@pytest.fixture(scope="module")
def mini():
    """Preloaded module at image_size 32 with the default protocol, and its setup warnings."""
    dm = kermany(MINI, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        dm.setup("test")
    return dm, [str(w.message) for w in caught]


def _paths(ds) -> list[str]:
    return [str(p) for p in ds.paths]


@needs_mini
def test_mini_counts_and_labels(mini):
    dm, _ = mini
    assert Counter(dm.val_set.classes) == {"NORMAL": 786, "CNV": 437, "DME": 64, "DRUSEN": 37}
    assert Counter(dm.test_set.classes) == {"NORMAL": 250, "CNV": 250}
    # seed 0 cuts no val patient short: the other half of the 1572 NORMAL scans all train
    assert Counter(dm.train_set.classes) == {"NORMAL": 786}
    assert set(_paths(dm.train_set)).isdisjoint(_paths(dm.val_set))
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        expected = [0 if c == "NORMAL" else 1 for c in ds.classes]
        assert torch.as_tensor(ds.labels).tolist() == expected
    assert dm.split_summary() == {
        "train": {"normal": 786, "anomalous": 0},
        "val": {"normal": 786, "anomalous": 538},
        "test": {"normal": 250, "anomalous": 250},
    }
    assert dm.n_skipped == 0


@needs_mini
def test_mini_val_capped_with_one_warning_each(mini):
    _, messages = mini
    abnormal = [m for m in messages if "val_abnormal" in m]
    normal = [m for m in messages if "val_normal" in m]
    assert len(abnormal) == 1 and "3000" in abnormal[0] and "538" in abnormal[0]
    assert len(normal) == 1 and "786" in normal[0] and "1572" in normal[0]


@needs_mini
def test_mini_items_and_batches(mini):
    dm, _ = mini
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        for i in (0, len(ds) // 2, len(ds) - 1):
            item = ds[i]
            assert item["x"].shape == (1, S, S) and item["x"].dtype == torch.float32
            assert isinstance(item["label"], int) and item["label"] == int(ds.labels[i])
            assert Path(item["id"]).is_file()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["x"].shape == (16, 1, S, S)
        assert -1.0 <= batch["x"].min() < batch["x"].max() <= 1.0
        assert batch["label"].dtype == torch.int64 and len(batch["id"]) == 16
    # val/test are ordered by class folder name: the first test batch holds CNV scans
    assert next(iter(dm.test_dataloader()))["label"].tolist() == [1] * 16


@needs_mini
def test_mini_patient_disjoint(mini):
    dm, _ = mini
    train = {patient_id(p) for p in dm.train_set.paths} - {None}
    val = {patient_id(p) for p in dm.val_set.paths} - {None}
    assert len(train) > 100 and len(val) > 100  # both sides hold Kermany-named scans
    assert train.isdisjoint(val)


@needs_mini
def test_mini_split_is_seeded(mini):
    dm, _ = mini

    def split(seed: int) -> tuple[list[str], list[str]]:
        lazy = kermany(MINI, preload=False, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lazy.setup("fit")
        return _paths(lazy.train_set), _paths(lazy.val_set)

    assert split(0) == (_paths(dm.train_set), _paths(dm.val_set))
    assert split(0) == split(0)
    assert split(1)[0] != split(0)[0]


@needs_mini
def test_mini_lazy_items_equal_preloaded(mini):
    dm, _ = mini
    lazy = kermany(MINI, preload=False)
    lazy.setup("test")
    for i in (0, 123, 251, 499):
        a, b = dm.test_set[i], lazy.test_set[i]
        assert a["id"] == b["id"] and a["label"] == b["label"]
        assert torch.equal(a["x"], b["x"])


# ---------------------------------------------------------------- tiny folders


def _save(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(
        path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    )
    return path


def _scan(w: int = 512, h: int = 496, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _jpeg_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """train: 6 NORMAL (2 patients + 2 id-less) and 2 CNV; test: 2 NORMAL, 1 DME, 1 CNV."""
    root = tmp_path / "OCT"
    for name in ("NORMAL-1-1.jpeg", "NORMAL-1-2.JPG", "NORMAL-2-1.png", "NORMAL-2-2.jpeg"):
        _save(root / "train/NORMAL" / name, _scan(seed=len(name)))
    _save(root / "train/NORMAL/normal_train_7.jpg", _scan(768))
    _save(root / "train/NORMAL/normal_train_8.PNG", _scan(1536, seed=3))
    _save(root / "train/CNV/CNV-1-5.jpeg", _scan(1024))
    _save(root / "train/CNV/CNV-3-1.jpeg", _scan(384))
    _save(root / "test/NORMAL/normal_test_1.jpg", _scan())
    _save(root / "test/NORMAL/normal_test_2.png", _scan(512, 512))
    _save(root / "test/DME/DME-9-1.jpeg", _scan(768))
    _save(root / "test/CNV/cnv_test_1.jpeg", _scan(1536))
    (root / "train/NORMAL/notes.txt").write_text("not an image, not counted")
    return root


def test_tiny_fit_and_test(tiny: Path):
    dm = kermany(tiny, val_normal=2, val_abnormal=1, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the caps: no warning
        dm.setup("fit")
    dm.setup("test")
    assert len(dm.val_set) == 3 and sorted(dm.val_set.labels.tolist()) == [0, 0, 1]
    assert dm.test_set.labels.tolist() == [1, 1, 0, 0]  # CNV, DME, NORMAL x2
    # patient 1 owns NORMAL and CNV scans: all on one side
    for side in (dm.train_set, dm.val_set):
        other = dm.val_set if side is dm.train_set else dm.train_set
        if any(patient_id(p) == "1" for p in side.paths):
            assert not any(patient_id(p) == "1" for p in other.paths)
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (4, 1, S, S)
    assert batch["cls"] == ["CNV", "DME", "NORMAL", "NORMAL"]  # class folders, per image


def test_colour_image_is_grayscale(tmp_path: Path):
    red = np.zeros((496, 600, 3), np.uint8)
    red[..., 0] = 255  # ITU-R 601-2 luma of pure red: 255 * 299 / 1000 = 76
    png = _save(tmp_path / "red.png", red)
    jpg = _save(tmp_path / "red.jpeg", red)
    ds = CropBScanDataset([png, jpg], [0, 0], ["NORMAL"] * 2, CROP, "center")
    assert read(png, S).ndim == 2
    assert torch.allclose(ds[0]["x"], torch.full((1, S, S), 76 / 127.5 - 1))
    assert torch.allclose(ds[1]["x"], torch.full((1, S, S), 76 / 127.5 - 1), atol=3 / 127.5)


def _add_corrupt(root: Path) -> list[Path]:
    garbage = root / "train/NORMAL/NORMAL-5-1.jpeg"
    garbage.write_bytes(b"definitely not a jpeg")
    data = _jpeg_bytes(_scan())
    truncated = root / "test/NORMAL/normal_test_3.jpeg"
    truncated.write_bytes(data[: len(data) // 2])
    return [garbage, truncated]


def test_corrupt_skipped_when_preloading(tiny: Path):
    bad = _add_corrupt(tiny)
    dm = kermany(tiny, val_normal=0, val_abnormal=0)
    with pytest.warns(UserWarning) as record:
        dm.setup()
    messages = [str(w.message) for w in record]
    for p in bad:
        assert sum(str(p) in m for m in messages) == 1
    assert dm.n_skipped == 2
    assert len(dm.train_set) == 6 and len(dm.test_set) == 4
    assert not {str(p) for p in bad} & {str(p) for p in dm.train_set.paths + dm.test_set.paths}
    assert len(dm.train_set.labels) == 6
    _ = [dm.train_set[i] for i in range(6)]


def test_corrupt_skipped_lazily(tiny: Path):
    bad = _add_corrupt(tiny)
    dm = kermany(tiny, preload=False, val_normal=0, val_abnormal=0)
    dm.setup("test")
    assert len(dm.test_set) == 5 and dm.n_skipped == 0
    i = dm.test_set.paths.index(bad[1])
    with pytest.warns(UserWarning, match="normal_test_3.jpeg"):
        assert dm.test_set[i] is None
    assert dm.n_skipped == 1
    loader = DataLoader(dm.test_set, batch_size=5, collate_fn=collate_skip_none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(loader))
    assert batch["x"].shape == (4, 1, S, S) and str(bad[1]) not in batch["id"]
    assert dm.n_skipped == 1  # counted once per file


def test_val_from_val_folder(tiny: Path):
    with pytest.raises(FileNotFoundError, match=str(tiny / "val")):
        kermany(tiny, val_from="val").setup("fit")
    _save(tiny / "val/NORMAL/NORMAL-1-9.jpeg", _scan())
    _save(tiny / "val/DRUSEN/DRUSEN-4-1.jpeg", _scan())
    dm = kermany(tiny, val_from="val", preload=False)
    dm.setup("fit")
    assert len(dm.train_set) == 6  # every NORMAL scan of train/
    assert dm.val_set.classes == ["DRUSEN", "NORMAL"] and dm.val_set.labels.tolist() == [1, 0]


def test_missing_root_and_split_folders(tmp_path: Path, tiny: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        kermany(missing).setup("fit")
    (tiny / "test/DME/DME-9-1.jpeg").unlink()
    (tiny / "test/DME").rmdir()
    for p in (tiny / "test").rglob("*"):
        if p.is_file():
            p.unlink()
    for d in sorted((tiny / "test").iterdir()):
        d.rmdir()
    (tiny / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=str(tiny / "test")):
        kermany(tiny, preload=False).setup("test")
    with pytest.raises(FileNotFoundError, match=str(tiny / "test")):  # fit fails before training
        kermany(tiny, preload=False).setup("fit")
    (tiny / "train").rename(tiny / "training")
    with pytest.raises(FileNotFoundError, match=str(tiny / "train")):
        kermany(tiny, preload=False).setup("validate")


def test_empty_class_folder_and_no_normal(tiny: Path):
    (tiny / "test/DRUSEN").mkdir()
    (tiny / "test/DRUSEN/readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=str(tiny / "test/DRUSEN")):
        kermany(tiny, preload=False).setup("test")
    for p in (tiny / "train/NORMAL").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=str(tiny / "train/NORMAL")):
        list_split(tiny / "train")
    (tiny / "train/NORMAL").rmdir()
    with pytest.raises(ValueError, match=f"no NORMAL images in {tiny / 'train'}"):
        kermany(tiny, preload=False).setup("validate")


def test_bad_options():
    for kwargs in ({"resize": "stretch"}, {"train_crop": "left"}, {"val_from": "test"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            kermany("/data", **kwargs)


def test_yaml_keys_are_constructor_args(tiny: Path):
    """conf/data/kermany.yaml: bscan_folder.yaml's keys (inherited, none copied) with its own
    _target_ and val_from."""
    own = OmegaConf.load(REPO / "anogan_lightning/conf/data/kermany.yaml")
    assert set(own) == {"defaults", "_target_", "val_from"}
    cfg = compose_data("kermany")
    assert OmegaConf.is_missing(cfg, "root")
    params = set(inspect.signature(BScanFolderDataModule).parameters)
    assert set(cfg) - {"_target_"} == params
    assert set(inspect.signature(KermanyDataModule).parameters) == {
        "root",
        "val_from",
        "bscan_folder",
    }
    assert cfg.val_from == "train" and cfg.csv is None
    # the default since retina windows beat the crop on Kermany test
    # (experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md)
    assert cfg.resize == "retina"
    dm = instantiate(cfg, root=str(tiny), preload=False, resize="crop", cache_dir=None)
    assert isinstance(dm, KermanyDataModule)
    assert (dm.batch_size, dm.num_workers, dm.val_normal, dm.val_abnormal) == (64, 2, 1000, 3000)
    with pytest.raises(ValueError, match="data=bscan_folder"):
        kermany(tiny, csv="list.csv")


# ---------------------------------------------------------------- split logic


def test_patient_id():
    assert patient_id("train/CNV/CNV-1016042-1.jpeg") == "1016042"
    assert patient_id("NORMAL-100980-2.JPEG") == "100980"
    assert patient_id("normal_train_1234.jpg") is None
    assert patient_id("NORMAL-abc-2.jpeg") is None


def _files(cls: str, patients: range, per_patient: int) -> list[Path]:
    return [Path(f"{cls}/{cls}-{p}-{i}.jpeg") for p in patients for i in range(per_patient)]


@pytest.mark.parametrize("seed", range(5))
def test_split_by_patient(seed: int):
    normal = _files("NORMAL", range(40), 3) + [
        Path(f"NORMAL/normal_train_{i}.jpg") for i in range(20)
    ]
    abnormal = _files("CNV", range(30, 70), 2) + _files("DME", range(60, 80), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val_no, val_ab = split_by_patient(normal, abnormal, 25, 50, seed)
    assert len(val_no) == 25 and len(val_ab) == 50
    assert {p.parent.name for p in val_ab} <= {"CNV", "DME"}
    assert set(val_no) <= set(normal) and set(train) <= set(normal)
    assert not set(train) & set(val_no)
    val_patients = {patient_id(p) for p in val_no + val_ab} - {None}
    assert not {patient_id(p) for p in train} & val_patients
    assert len(train) >= len(normal) - 25 - 2 * 2  # at most one cut patient per val part
    assert (train, val_no, val_ab) == split_by_patient(normal, abnormal, 25, 50, seed)


def test_split_caps_warn_once():
    normal = [Path(f"NORMAL/normal_train_{i}.jpg") for i in range(10)]
    abnormal = _files("CNV", range(3), 2)
    with pytest.warns(UserWarning) as record:
        train, val_no, val_ab = split_by_patient(normal, abnormal, 8, 100, 0)
    assert len(record) == 2
    assert "val_abnormal=100" in str(record[0].message)
    assert "val_normal=8 capped at 5" in str(record[1].message)
    assert (len(train), len(val_no), len(val_ab)) == (5, 5, 6)


# ---------------------------------------------------------------- transforms


def _vertical_pattern(w: int, h: int = 496) -> np.ndarray:
    rows = np.random.default_rng(0).integers(0, 256, h, dtype=np.uint8)
    return np.tile(rows[:, None], (1, w))


def test_centre_crop_ignores_width(tmp_path: Path):
    """Same vertical pattern at 1536 and 512 columns: identical crops, array or JPEG file."""
    wide, narrow = _vertical_pattern(1536), _vertical_pattern(512)
    a, b = crop_square(fit_height(wide, 64)), crop_square(fit_height(narrow, 64))
    assert a.shape == (64, 64) and np.array_equal(a, b)
    fa = read(_save(tmp_path / "wide.jpeg", wide))  # reduced-scale JPEG decode
    fb = read(_save(tmp_path / "narrow.jpeg", narrow))
    assert fa.shape == (64, 198) and fb.shape == (64, 66)
    assert np.array_equal(crop_square(fa), crop_square(fb))
    # squash does not: the same anatomy comes out differently at different widths
    assert np.array_equal(squash(wide, 64), squash(narrow, 64))  # constant along rows...
    checker = (np.indices((496, 1536)).sum(0) // 16 % 2 * 255).astype(np.uint8)
    assert not np.array_equal(squash(checker, 64), squash(checker[:, :512], 64))
    assert np.array_equal(
        crop_square(fit_height(checker, 62)), crop_square(fit_height(checker[:, :512], 62))
    )  # 496/62 = 8: an exact pixel grid, so both crops see the same checker phase


@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_and_values_do_not_depend_on_width(size: int):
    outs = []
    for w, h in [(384, 496), (512, 496), (768, 496), (1024, 496), (1536, 496), (512, 512)]:
        flat = np.full((h, w), 90, np.uint8)
        outs.append(crop_square(pad_width(fit_height(flat, size), size)))
        assert squash(flat, size).shape == (size, size)
    assert all(o.shape == (size, size) for o in outs)
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_narrow_image_padded_with_background():
    a = np.full((496, 384), 200, np.uint8)
    a[:, :5] = 10  # darkest column: the pad value
    strip = fit_height(a, 64)
    assert strip.shape == (64, 50)
    out = crop_square(strip)
    assert out.shape == (64, 64)
    assert (out[:, :7] == strip.min()).all() and (out[:, -7:] == strip.min()).all()
    assert np.array_equal(out[:, 7:57], strip)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_circle_stays_round():
    img = Image.new("L", (1024, 496), 0)
    ImageDraw.Draw(img).ellipse((512 - 150, 248 - 150, 512 + 150, 248 + 150), fill=255)
    dy, dx = _extent(crop_square(fit_height(img, 64)) > 127)
    assert abs(dy - dx) <= 1 and 35 <= dy <= 41  # 300 / 496 * 64 = 38.7
    dy, dx = _extent(squash(img, 64) > 127)  # squashed: 16x across, 7.75x down
    assert dx < 0.6 * dy


def test_random_crop_moves_centre_crop_does_not(tmp_path: Path):
    ramp = np.tile(np.linspace(0, 255, 1536).astype(np.uint8), (496, 1))
    path = _save(tmp_path / "NORMAL-1-1.png", ramp)
    torch.manual_seed(0)
    rand = CropBScanDataset([path], [0], ["NORMAL"], CROP, "random")
    centre = CropBScanDataset([path], [0], ["NORMAL"], CROP, "center")
    rand.preload()
    crops = {rand[0]["x"].mean().item() for _ in range(10)}
    assert len(crops) > 5
    assert len({centre[0]["x"].mean().item() for _ in range(3)}) == 1
    assert centre[0]["x"].mean().abs() < 0.05  # middle of the ramp


def test_to_unit_range_and_bad_crop():
    a = np.array([[0, 255, 128]], np.uint8)
    out = to_unit_range(a)
    assert out.dtype == np.float32 and out[0, 0] == -1 and out[0, 1] == 1
    assert abs(out[0, 2] - 0.0039) < 1e-3
    with pytest.raises(ValueError, match="left=40"):
        crop_square(np.zeros((32, 64), np.uint8), left=40)


@needs_mini
def test_mini_flatten_option():
    """data.crop_flatten=true flattens each scan before the resize (real B-scans)."""
    path = sorted((MINI / "train/NORMAL").glob("NORMAL-*"))[0]
    flat = read(path, flatten=True)
    plain = read(path)
    assert flat.shape == plain.shape and not np.array_equal(flat, plain)
    dm = kermany(MINI, preload=False, crop_flatten=True)
    dm.setup("test")
    assert dm.test_set.flatten and dm.test_set[0]["x"].shape == (1, S, S)


def test_registration_fill_becomes_background(tmp_path: Path):
    """A rotated scan's white wedges are set to the dark background before the resize."""
    rng = np.random.default_rng(0)
    a = rng.integers(20, 120, (496, 512), dtype=np.uint8)
    rows, cols = np.indices(a.shape)
    wedge = rows < 120 - cols * 0.4  # top-left triangle, as registration leaves it
    a[wedge] = 255
    path = _save(tmp_path / "NORMAL-1-1.png", a)
    plain = read(path, fill_white=False)
    filled = read(path, fill_white=True)
    assert plain[:5, :5].min() > 240  # the wedge survives a plain resize
    assert filled.max() < 130 and filled[:5, :5].max() < 60
    np.testing.assert_array_equal(filled[-20:], plain[-20:])  # the rest is untouched
    default = BScanPreprocessing(image_size=64, resize="crop")  # filling is the default
    np.testing.assert_array_equal(
        CropBScanDataset([path], [0], ["N"], default, "center").strip(0), filled
    )


def test_fill_white_has_one_default():
    """BScanPreprocessing, the data module and conf/data/bscan_folder.yaml (which kermany.yaml
    inherits) share one default; the reader and the datasets take none (the preprocessing's)."""
    default = inspect.signature(BScanFolderDataModule).parameters["fill_white"].default
    assert default is BScanPreprocessing().fill_white is True
    assert compose_data("bscan_folder").fill_white is default
    assert compose_data("kermany").fill_white is default
    assert inspect.signature(read_image).parameters["fill_white"].default is inspect.Parameter.empty
    assert "fill_white" not in inspect.signature(CropBScanDataset).parameters


@needs_mini
def test_mini_scans_with_fill_are_cleaned():
    files = sorted((MINI / "test/CNV").glob("*.jpg"))[:60]
    cleaned = 0
    for f in files:
        plain, filled = read(f, fill_white=False), read(f, fill_white=True)
        if (plain >= 250).mean() > 0.01:
            assert (filled >= 250).mean() < 0.2 * (plain >= 250).mean(), f
            cleaned += 1
    assert cleaned > 5  # kermany-mini's test scans do carry such wedges
