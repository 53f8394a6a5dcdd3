"""Whole-scan windows of retina-normalised B-scans, window -> B-scan aggregation, stitched maps,
per-region overlap, and the bscan_folder data module (class folders, CSV, masks, groups)."""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing
from anogan_lightning.data.bscan.retina_windows import RetinaBScanDataset
from anogan_lightning.data.bscan_folder import BScanFolderDataModule
from anogan_lightning.data.kermany import KermanyDataModule
from anogan_lightning.data.retina.normalize import RetinaNorm
from anogan_lightning.evaluation import pixel, stitch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data"


def scan(
    w: int = 384,
    h: int = 248,
    seed: int = 0,
    cyst: bool = False,
    thickness: float = 60.0,
    pit: float = 20.0,
    swelling: float = 0.0,
):
    """uint8 phantom B-scan (retina ``thickness`` rows thick, a foveal ``pit`` at the centre, a
    ``swelling`` to the right of it, bright RPE) and its lesion mask (a dark cyst)."""
    rng = np.random.default_rng(seed)
    u = np.linspace(-1, 1, w)
    bm = 160 + 10 * u + 15 * u**2
    bump = np.exp(-(((u - 0.3) / 0.25) ** 2))
    ilm = bm - thickness + pit * np.exp(-((u / 0.2) ** 2)) - swelling * bump
    r = np.arange(h)[:, None]
    img = np.where((r >= ilm) & (r < bm), 110.0, 20.0)
    img = np.where((r >= bm - 8) & (r < bm), 230, np.where(r >= bm, 70, img))
    mask = np.zeros((h, w), np.uint8)
    if cyst:
        c = w // 3
        mask[(r - (bm[c] - 30)) ** 2 / 100 + (np.arange(w)[None] - c) ** 2 / 400 <= 1] = 1
        img = np.where(mask > 0, 15, img)
    img = img * rng.gamma(8, 1 / 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def save(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


S = 32
RETINA = {"height": 32, "spacing_y_um": 7.74, "x_scale": 0.5}  # 248-row phantoms, half the columns


def prep(**kw) -> BScanPreprocessing:
    """S-pixel windows 16 apart on RETINA bands; ``kw`` on top."""
    args = {"image_size": S, "retina": RetinaNorm(**RETINA), "window_stride": 16}
    return BScanPreprocessing(**{**args, **kw})


# ---------------------------------------------------------------- aggregation and AUPRO


def test_aggregate_windows_rules():
    scores = torch.tensor([1.0, 5.0, 2.0, 0.5, 4.0, 3.0])
    index = torch.tensor([0, 0, 0, 2, 2, 2])  # B-scan 1 has no window
    s, _ = stitch.aggregate_windows(scores, index, 3, "max")
    assert s[0] == 5 and s[2] == 4 and math.isnan(s[1])
    s, _ = stitch.aggregate_windows(scores, index, 3, "mean")
    assert torch.allclose(s[[0, 2]], torch.tensor([8 / 3, 7.5 / 3], dtype=torch.float64))
    s, alt = stitch.aggregate_windows(scores, index, 3, "topk", top_k=2, all_rules=True)
    assert s[0] == 3.5 and s[2] == 3.5
    assert set(alt) == {"window_max", "window_top2", "window_mean"}
    assert torch.allclose(alt["window_top2"][[0, 2]], s[[0, 2]])
    with pytest.raises(ValueError, match="median"):
        stitch.aggregate_windows(scores, index, 3, "median")


def test_retina_map_scores_mean_inside_the_retina_only():
    maps = np.zeros((3, 4, 6), np.float32)
    maps[0, 1:3, :] = 2.0  # inside the retina
    maps[0, 0, :] = 100.0  # outside: ignored
    maps[1, 1, 0] = np.nan  # unscored pixel: ignored
    maps[1, 1:3, 1:] = 1.0
    retina = [np.zeros((4, 6), bool) for _ in range(3)]
    retina[0][1:3] = retina[1][1:3] = True
    retina[2] = np.zeros((4, 5), bool)  # narrower than the padded map, no retina: NaN
    s = stitch.retina_map_scores(maps, retina)
    assert s[0] == 2.0 and s[1] == pytest.approx(10 / 11) and math.isnan(s[2])


def test_aupro_perfect_chance_and_small_regions_count():
    masks = np.zeros((1, 20, 40), np.uint8)
    masks[0, 2:4, 2:4] = 1  # a small region
    masks[0, 10:18, 20:38] = 1  # a large one
    perfect = masks.astype(np.float32) + 0.01 * np.random.default_rng(0).random(masks.shape)
    pro, n = pixel.aupro(perfect, masks)
    assert n == 2 and pro > 0.99
    only_large = np.where(masks[0, :, 20:] > 0, 1.0, 0.0)[None]
    full = np.zeros(masks.shape, np.float32)
    full[:, :, 20:] = only_large
    pro_large, _ = pixel.aupro(full, masks)
    assert 0.45 < pro_large < 0.75  # half the regions found, however large the other is
    rand = np.random.default_rng(1).random(masks.shape).astype(np.float32)
    assert pixel.aupro(rand, masks)[0] < 0.35  # chance: ~fpr_limit / 2
    assert math.isnan(pixel.aupro(rand, np.zeros_like(masks))[0])
    m = pixel.pixel_metrics(perfect, masks)
    assert m["test/pixel_aupro"] > 0.99 and m["test/pixel_regions"] == 2


# ---------------------------------------------------------------- windows dataset


@pytest.fixture
def files(tmp_path: Path):
    paths, masks = [], []
    for i in range(4):
        img, mask = scan(w=320 + 64 * i, seed=i, cyst=i % 2 == 1)
        paths.append(save(tmp_path / f"img/s{i}.png", img))
        masks.append(save(tmp_path / f"mask/s{i}.png", mask * 255))
    bad = save(tmp_path / "img/blank.png", np.full((248, 320), 30, np.uint8))
    return tmp_path, paths + [bad], masks + [None]


def test_grid_windows_cover_every_band_and_failures_are_named(files):
    tmp, paths, masks = files
    ds = prep().eval_dataset(paths, [0, 1, 0, 1, 0], ["N"] * 5, masks, None)
    assert isinstance(ds, RetinaBScanDataset) and ds.mode == "grid" and ds.stride == 16
    with pytest.warns(UserWarning, match="blank.png: constant"):
        ds.preload("test")
    assert ds.n_skipped == 1 and len(ds.image_ids) == 4 and "blank" not in " ".join(ds.image_ids)
    shapes = ds.image_shapes
    assert (shapes[:, 0] == 32).all() and list(shapes[:, 1]) == [160, 192, 224, 256]
    stitcher = stitch.Stitcher(shapes)
    for k in range(len(ds)):
        item = ds[k]
        assert item["x"].shape == (1, S, S) and item["mask"].shape == (1, S, S)
        stitcher.add(torch.ones(1, 1, S, S), item["coords"][None])
    maps = stitcher.maps()
    for i, (h, w) in enumerate(shapes):
        assert not np.isnan(maps[i, :h, :w]).any()  # every pixel of every band scored
    assert ds.image_mask(1).any() and not ds.image_mask(0).any()
    # retina pixels: ILM to BM rows of the band; the cyst lies inside the retina
    for i, (h, w) in enumerate(shapes):
        inside = ds.image_retina(i)
        assert inside.shape == (h, w) and 0.3 < inside.mean() < 0.9
        assert not inside[0].any() and not inside[-1].any()  # margins above ILM and below BM
    cyst = ds.image_mask(1) > 0
    assert ds.image_retina(1)[cyst].mean() > 0.95
    # map_region="retina" (the default, prep()): maps 0 outside ILM..BM, unchanged inside, NaN kept
    maps[0, 0, 0] = np.nan
    kept = ds.restrict_maps(maps)
    assert np.isnan(kept[0, 0, 0]) and not np.isnan(maps).all()
    for i, (h, w) in enumerate(shapes):
        inside = ds.image_retina(i)
        band = kept[i, :h, :w]
        assert (band[inside] == 1).all() and (band[~inside & ~np.isnan(band)] == 0).all()
    signed = maps - 1  # a map with negative values: its minimum outside
    h, w = shapes[1]
    signed[1, :h, :w][ds.image_retina(1)] = np.linspace(-3, 2, int(ds.image_retina(1).sum()))
    out = ds.restrict_maps(signed)[1, :h, :w][~ds.image_retina(1)]
    assert (out == -3).all()
    ds.map_region = "band"
    np.testing.assert_array_equal(ds.restrict_maps(maps), maps)
    with pytest.raises(ValueError, match="map_region='vitreous'"):
        prep(map_region="vitreous")
    item = ds[0]
    assert item["id"].endswith("s0.png:y0:x0") and item["coords"].tolist() == [0, 0, 0]


def test_random_windows_move_and_cache_is_reused(files):
    tmp, paths, masks = files
    ds = prep().train_dataset(paths[:4], [0] * 4, ["N"] * 4, None, "random", tmp / "c")
    ds.preload()
    assert len(ds) == 4 and len(list((tmp / "c").glob("*.npz"))) == 1
    torch.manual_seed(0)
    xs = {int(ds[3]["coords"][2]) for _ in range(10)}
    assert len(xs) > 3
    again = prep().train_dataset(paths[:4], [0] * 4, ["N"] * 4, None, "random", tmp / "c")
    again.preload()
    np.testing.assert_array_equal(again.image(2), ds.image(2))
    np.testing.assert_array_equal(again.image_retina(2), ds.image_retina(2))  # cached too
    taller = prep(retina=RetinaNorm(**{**RETINA, "height": 48}))
    other = taller.train_dataset(paths[:4], [0] * 4, ["N"] * 4, None, "random", tmp / "c")
    other.preload()  # another setting: another cache entry
    assert len(list((tmp / "c").glob("*.npz"))) == 2 and other.image(0).shape[0] == 48


def test_thickness_score_rises_with_a_local_swelling(tmp_path: Path):
    """The anatomy reference: a retina thickened over a third of its width scores above the
    same retina without it; the ratio does not depend on the axial scale of the scan."""
    shapes = {"flat": (60, 0), "swollen": (60, 40), "swollen_thin": (36, 24)}  # 0.6 of it
    paths = [
        save(tmp_path / f"{name}.png", scan(thickness=t, pit=0, swelling=s)[0])
        for name, (t, s) in shapes.items()
    ]
    ds = prep().eval_dataset(paths, [0, 1, 1], ["N", "F", "F"], None, None)
    ds.preload()
    t = ds.thickness_scores()
    assert t.shape == (3,) and torch.isfinite(t).all()
    assert t[0] < 0.05 < t[1]  # flat: upper quartile = median
    assert abs(float(t[2] - t[1])) < 0.1  # the same shape at 0.6 of the thickness


def test_mask_of_another_size_is_an_error_naming_it(files):
    tmp, paths, _ = files
    wrong = save(tmp / "mask/wrong.png", np.zeros((10, 10), np.uint8))
    ds = prep().eval_dataset(paths[:1], [1], ["DME"], [wrong], None)
    with pytest.warns(UserWarning, match="mask .*wrong.png is 10x10"):
        ds.preload()
    assert ds.n_skipped == 1


# ---------------------------------------------------------------- bscan_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Class folders without splits: 8 NORMAL of 4 patients, 4 DME of 2 with masks."""
    root = tmp_path / "scans"
    for p in range(4):
        for k in range(2):
            img, _ = scan(seed=10 * p + k)
            save(root / f"NORMAL/NORMAL-{p}-{k}.png", img)
    for p in range(4, 6):
        for k in range(2):
            img, mask = scan(seed=10 * p + k, cyst=True)
            save(root / f"DME/DME-{p}-{k}.png", img)
            save(root / f"lesions/DME/DME-{p}-{k}.png", mask * 255)
    return root


def _module(root: Path, **kw) -> BScanFolderDataModule:
    args = dict(
        image_size=S, retina=RETINA, batch_size=4, num_workers=0, window_stride=16, cache_dir=None
    )
    return BScanFolderDataModule(str(root), **{**args, **kw})


def test_class_folders_pool_split_by_patient_with_masks(folder: Path):
    dm = _module(folder, mask_dir="lesions", pool_split=(0.5, 0.25, 0.25), seed=1)
    dm.setup("fit")
    dm.setup("test")
    groups = {}
    for name in ("train", "val", "test"):
        ds = getattr(dm, f"{name}_set")
        groups[name] = {Path(p).stem.split("-")[1] for p in ds.image_ids}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert set(dm.train_set.classes) == {"NORMAL"} and len(dm.train_set.paths) == 4
    ds = dm.val_set if dm.val_set.has_mask else dm.test_set
    assert ds.has_mask and any(ds.image_mask(i) is not None for i in range(len(ds.image_ids)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, S, S)


def test_csv_with_own_column_names_test_only(folder: Path):
    rows = ["scan,diag,eye,lesion"]
    for p in sorted(folder.rglob("*.png")):
        if "lesions" in p.parts:
            continue
        rel = p.relative_to(folder)
        lesion = f"lesions/{rel}" if rel.parts[0] == "DME" else ""
        rows.append(f"{rel},{int(rel.parts[0] == 'DME')},{p.stem.split('-')[1]},{lesion}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    dm = _module(
        folder,
        csv="list.csv",
        path_column="scan",
        label_column="diag",
        group_column="eye",
        mask_column="lesion",
        pool_split=(0, 0.34, 0.66),
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set.paths) == 0
    with pytest.raises(ValueError, match="no NORMAL scans in the train split"):
        dm.train_dataloader()
    n = len(dm.val_set.image_ids) + len(dm.test_set.image_ids)
    assert n == 12 and set(dm.test_set.classes) <= {"NORMAL", "diag"}
    with pytest.raises(ValueError, match="no column 'grade'"):
        _module(folder, csv="list.csv", path_column="scan", label_column="grade").setup("fit")
    (folder / "bad.csv").write_text("scan,diag\nNORMAL/none.png,0\n")
    with pytest.raises(FileNotFoundError, match="none.png"):
        _module(folder, csv="bad.csv", path_column="scan", label_column="diag").setup("fit")


def test_yaml_keys_are_constructor_args():
    cfg = OmegaConf.load(REPO / "anogan_lightning/conf/data/bscan_folder.yaml")
    assert set(cfg) - {"_target_"} == set(inspect.signature(BScanFolderDataModule).parameters)
    # data=kermany: the same keys (inherited), its own val_from (tests/test_data_kermany.py)
    assert issubclass(KermanyDataModule, BScanFolderDataModule)


def test_constructor_defaults_are_the_yaml_values():
    """One default per setting: every default of the data module, of BScanPreprocessing and of
    RetinaNorm is conf/data/bscan_folder.yaml's value (root and cache_dir have none)."""
    cfg = OmegaConf.to_container(
        OmegaConf.load(REPO / "anogan_lightning/conf/data/bscan_folder.yaml")
    )
    params = inspect.signature(BScanFolderDataModule).parameters
    for name in ("root", "cache_dir"):
        assert params[name].default is inspect.Parameter.empty, name
    for name, p in params.items():
        if name in ("root", "cache_dir", "retina"):
            continue
        d = list(p.default) if isinstance(p.default, tuple) else p.default
        assert d == cfg[name], (name, d, cfg[name])
    assert params["retina"].default is None  # RetinaNorm's defaults:
    assert {k: RetinaNorm().key()[k] for k in cfg["retina"]} == cfg["retina"]
    assert BScanPreprocessing.from_data_config(cfg) == BScanPreprocessing()


@pytest.mark.skipif(not (SHARED / "duke-dme-fluid").is_dir(), reason="duke-dme-fluid absent")
def test_duke_and_mexico_load_unrenamed(tmp_path: Path):
    cfg = OmegaConf.load(REPO / "anogan_lightning/conf/data/bscan_folder.yaml")
    duke = dict(
        root=str(SHARED / "duke-dme-fluid"),
        csv="manifest.csv",
        path_column="file",
        label_column="has_fluid",
        group_column="subject",
        image_dir="images",
        mask_dir="masks",
        pool_split=[0, 0.2, 0.8],
        cache_dir=str(tmp_path),
        num_workers=0,
    )
    dm = instantiate(OmegaConf.merge(cfg, duke))
    dm.scans()
    scans = dm.scans()
    assert len(scans) == 55 and all(s.mask is not None for s in scans)
    assert sum(not s.normal for s in scans) == 40 and len({s.group for s in scans}) == 5
    if (SHARED / "mexico-dme").is_dir():
        mx = instantiate(
            OmegaConf.merge(cfg, {"root": str(SHARED / "mexico-dme"), "cache_dir": None})
        )
        scans = mx.scans()
        assert len(scans) == 200 and {s.split for s in scans} == {"test"}
        assert sum(s.normal for s in scans) == 130 and {s.cls for s in scans} == {"NORMAL", "DME"}


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("rule", ["topk", "map_retina"])
def test_end_to_end_windows_aggregation_pixels_and_overlays(folder: Path, tmp_path: Path, rule):
    """Autoencoder through the entry point on the folder: B-scan scores from windows, every
    rule's AUROC, pixel metrics of the stitched maps, overlays."""
    from conftest import compose_cfg, tiny_overrides

    from anogan_lightning.train import run

    split = {"0": "train", "1": "train", "2": "val", "4": "val", "3": "test", "5": "test"}
    rows = ["file,label,split"]
    for p in sorted(folder.glob("[DN]*/*.png")):
        rows.append(f"{p.relative_to(folder)},{p.parent.name},{split[p.stem.split('-')[1]]}")
    (folder / "split.csv").write_text("\n".join(rows) + "\n")
    overrides = [o for o in tiny_overrides("autoencoder") if not o.startswith("data.")]
    overrides += [
        "data=bscan_folder",
        "data.resize=retina",
        f"data.root={folder}",
        "data.csv=split.csv",
        "data.path_column=file",
        "data.split_column=split",
        "data.mask_dir=lesions",
        f"data.image_size={S}",
        "data.retina.height=32",
        "data.retina.spacing_y_um=7.74",
        "data.window_stride=16",
        "data.num_workers=0",
        "data.batch_size=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.aggregate={rule}",
        "figures=true",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(compose_cfg(overrides, tmp_path / "run"))
    n_test = 4
    for name in ("max", "top3", "mean"):
        assert f"test/auroc_window_{name}" in results
    assert 0 <= results["test/auroc_map_retina"] <= 1  # the mean map over the retina, reported
    assert 0 <= results["test/auroc_thickness"] <= 1  # the anatomy reference, every method
    chosen = {"topk": "test/auroc_window_top3", "map_retina": "test/auroc_map_retina"}[rule]
    assert results["test/auroc"] == results[chosen]
    assert 0 <= results["test/pixel_auroc"] <= 1 and results["test/pixel_regions"] >= 1
    assert 0 <= results["test/pixel_aupro"] <= 1
    scores = (tmp_path / "run/scores.csv").read_text().splitlines()
    assert len(scores) == 1 + n_test and ":y" not in scores[1]  # one row per B-scan
    assert list((tmp_path / "run/bscans").glob("bscan_*.png"))
