"""The built-in synthetic OCT data: deterministic, labelled by its masks, lesions as described."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anogan_lightning.data.synthetic import (
    LESIONS,
    SyntheticOCTDataModule,
    make_split,
    render_bscan,
)


def test_deterministic_and_independent_of_count():
    a = make_split(20, 32, "test", seed=3)
    b = make_split(40, 32, "test", seed=3)
    assert torch.equal(a.images, b.images[:20]) and torch.equal(a.masks, b.masks[:20])
    c = make_split(20, 32, "test", seed=4)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(make_split(5, 32, "val", seed=3).images, a.images[:5])


def test_splits_labels_masks_and_range():
    dm = SyntheticOCTDataModule(
        n_train=64, n_val=64, n_test=128, image_size=32, seed=0, eval_batch_size=128
    )
    dm.setup()
    assert dm.train_set.labels.sum() == 0 and dm.train_set.masks.sum() == 0
    for ds in (dm.val_set, dm.test_set):
        has_lesion = ds.masks.flatten(1).amax(1) > 0
        assert torch.equal(has_lesion.long(), ds.labels)
        assert 0.3 < ds.labels.float().mean() < 0.7
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (128, 1, 32, 32) and batch["mask"].shape == (128, 1, 32, 32)
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert dm.split_summary()["train"] == {"normal": 64, "anomalous": 0}


def _pair(lesion: str, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same scan without and with one lesion (same random stream), and its mask."""
    normal, _ = render_bscan(np.random.default_rng(seed), size, (), speckle_looks=1e6)
    ill, mask = render_bscan(np.random.default_rng(seed), size, (lesion,), speckle_looks=1e6)
    return normal, ill, mask.astype(bool)


@pytest.mark.parametrize("seed", range(3))
def test_lesions_look_as_described(seed: int):
    normal, fluid, mask = _pair("fluid", seed=seed)
    assert mask.sum() > 20 and fluid[mask].mean() < normal[mask].mean() - 0.1  # dark pocket
    normal, foci, mask = _pair("foci", seed=seed)
    assert mask.sum() > 3 and foci[mask].mean() > normal[mask].mean() + 0.2  # bright dots
    normal, drusen, mask = _pair("drusen", seed=seed)
    # the raised RPE: the brightest row of the lesion's columns moves up
    cols = np.nonzero(mask.any(0))[0]
    assert drusen[:, cols].argmax(0).mean() < normal[:, cols].argmax(0).mean() - 1
    # nothing changes away from the lesion's columns
    far = np.ones(64, bool)
    far[max(cols.min() - 8, 0) : cols.max() + 8] = False
    same = np.abs(drusen[:, far] - normal[:, far]) < 0.01
    assert same.mean() > 0.99  # the bump's tails may flip a boundary pixel or two


def test_retina_is_layered_with_bright_rpe_and_dark_vitreous():
    img, _ = render_bscan(np.random.default_rng(0), 64, (), speckle_looks=1e6)
    profile = img[:, 28:36].mean(1)  # a vertical profile near the centre
    assert profile[:10].mean() < 0.1  # vitreous
    rpe_row = int(profile.argmax())
    assert 30 < rpe_row < 56 and profile[rpe_row] > 0.8
    retina = profile[rpe_row - 16 : rpe_row]
    assert retina.max() - retina.min() > 0.3  # distinct bright and dark bands


def test_difficulty_knobs():
    assert set(LESIONS) == {"fluid", "foci", "drusen"}
    small = make_split(64, 32, "test", lesion_scale=0.5).masks.sum()
    large = make_split(64, 32, "test", lesion_scale=1.5).masks.sum()
    assert large > 2 * small
    calm = make_split(64, 32, "train", shape_variability=0.0).images.std(0).mean()
    wild = make_split(64, 32, "train", shape_variability=2.0).images.std(0).mean()
    assert wild > calm
