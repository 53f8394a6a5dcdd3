"""Listing B-scans: symbolic links to class folders and files are followed (loops are not),
and the data modules' check() names a wrong root, folder or file before anything is read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anogan_lightning.data.bscan.io import list_images, walk_files
from anogan_lightning.data.bscan_folder import BScanFolderDataModule
from anogan_lightning.data.kermany import KermanyDataModule

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def _module(cls, root: Path, **kw):
    args = {"resize": "crop", "preload": False, "num_workers": 0, "cache_dir": None}
    return cls(str(root), **{**args, **kw})


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """<root>/{train,test}/<CLASS> are links to class folders kept elsewhere, one file is a link,
    one link points back up (a loop) and one is broken."""
    store = tmp_path / "store"
    for cls, n in (("NORMAL", 4), ("CNV", 2)):
        for k in range(n):
            _png(store / "train" / cls / f"{cls}-{k}-1.png", seed=k)
            _png(store / "test" / cls / f"{cls}-{10 + k}-1.png", seed=10 + k)
    _png(tmp_path / "elsewhere/DME-7-1.png", seed=7)
    root = tmp_path / "root"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for cls in ("NORMAL", "CNV"):
            (root / split / cls).symlink_to(store / split / cls, target_is_directory=True)
    (root / "test/DME").mkdir()
    (root / "test/DME/DME-7-1.png").symlink_to(tmp_path / "elsewhere/DME-7-1.png")
    (root / "test/DME/loop").symlink_to(root, target_is_directory=True)  # back up: a loop
    (root / "test/DME/broken.png").symlink_to(tmp_path / "nowhere.png")
    return root


@needs_symlinks
def test_walk_follows_links_and_skips_loops(linked: Path):
    files = walk_files(linked)
    rel = [str(p.relative_to(linked)) for p in files]
    assert rel == sorted(rel) and len(rel) == 13  # 12 through the class links + 1 linked file
    assert "test/DME/DME-7-1.png" in rel and not any("loop" in r for r in rel)
    assert all(p.is_file() for p in files)  # the broken link is not listed
    assert list_images(linked) == files
    assert list_images(linked / "test/CNV") == sorted((linked / "test/CNV").iterdir())


@needs_symlinks
@pytest.mark.parametrize("cls", [BScanFolderDataModule, KermanyDataModule])
def test_modules_list_linked_class_folders(linked: Path, cls):
    dm = _module(cls, linked, val_normal=1, val_abnormal=1)
    assert dm.check() == {"train": 6, "test": 7}
    dm.setup("fit")
    dm.setup("test")
    assert sorted(dm.test_set.classes) == ["CNV", "CNV", "DME", *["NORMAL"] * 4]
    assert len(dm.train_set) + len(dm.val_set) == 4 + 1  # the NORMALs, and one CNV in val
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert all(str(p).startswith(str(linked)) for p in ds.paths)  # as reached, not resolved
        assert ds.item(0)["x"].shape == (1, 64, 64)


def test_check_names_what_is_missing(tmp_path: Path):
    missing = tmp_path / "nowhere"
    for cls in (BScanFolderDataModule, KermanyDataModule):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            _module(cls, missing).check()
    root = tmp_path / "scans"
    _png(root / "test/NORMAL/a.png")
    _png(root / "test/DME/b.png")
    # Kermany's layout needs train/ (for fit) and test/; a test-only check passes
    assert _module(KermanyDataModule, root).check("test") == {"test": 2}
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        _module(KermanyDataModule, root).check()
    # the generic module takes a test-only folder (evaluation), but not a file outside classes
    assert _module(BScanFolderDataModule, root).check() == {"test": 2}
    _png(root / "loose.png")
    with pytest.raises(ValueError, match="loose.png: not in a class folder"):
        _module(BScanFolderDataModule, root).check()
    (root / "loose.png").unlink()
    (root / "train/NORMAL").mkdir(parents=True)  # an empty class folder
    with pytest.raises(ValueError, match=str(root / "train/NORMAL")):
        _module(KermanyDataModule, root).check()
    with pytest.raises(FileNotFoundError, match=str(root / "list.csv")):
        _module(BScanFolderDataModule, root, csv="list.csv").check()
    (root / "list.csv").write_text("path,label\ntest/NORMAL/a.png,0\ntest/NORMAL/gone.png,0\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        _module(BScanFolderDataModule, root, csv="list.csv").check()


def test_check_reads_no_image(tmp_path: Path):
    """check() lists; it neither decodes nor normalises (a corrupt file passes it)."""
    root = tmp_path / "scans"
    _png(root / "train/NORMAL/NORMAL-1-1.png")
    (root / "test/CNV").mkdir(parents=True)
    (root / "test/CNV/CNV-2-1.png").write_bytes(b"not a png")
    dm = _module(KermanyDataModule, root, resize="retina", preload=True)
    assert dm.check() == {"train": 1, "test": 1}
    assert dm.train_set is None and dm.test_set is None


def test_every_data_module_has_check():
    """train.py may call check() on any data module: those without files to list say so."""
    from anogan_lightning.data.synthetic import SyntheticOCTDataModule

    assert SyntheticOCTDataModule(image_size=16).check() == {}
