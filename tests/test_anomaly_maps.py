"""Anomaly maps of the reconstruction methods (scoring.anomaly_map, the ``map`` hyperparameter):
what each map is, the residual normaliser fitted on training normals (0.1 checkpoints, from
before the maps, are refused: tests/test_method_base.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from anogan_lightning import scoring

RECONSTRUCTION_METHODS = [
    "autoencoder",
    "pix2pix_image",
    "pix2pix_latent",
    "sparse_gan",
    "acae",
    "fanogan",
]


def _pair(seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.rand(2, 1, size, size, generator=g) * 1.6 - 0.8
    return x_hat + 0.05 * torch.randn(x_hat.shape, generator=g), x_hat


def test_maps_of_identical_images_are_zero_and_dark_sees_only_darker():
    _, x_hat = _pair()
    for kind in ("residual", "dark", "ssim"):
        assert scoring.anomaly_map(kind, x_hat, x_hat).abs().max() < 1e-5, kind
    x = x_hat.clone()
    x[:, :, 4:10, 4:10] -= 0.5  # darker than expected (fluid)
    x[:, :, 20:26, 20:26] += 0.5  # brighter than expected
    dark = scoring.anomaly_map("dark", x, x_hat)
    res = scoring.anomaly_map("residual", x, x_hat)
    assert dark[:, :, 4:10, 4:10].min() > 0.49 and dark[:, :, 20:26, 20:26].max() == 0
    assert res[:, :, 20:26, 20:26].min() > 0.49  # the residual sees both
    smooth = scoring.anomaly_map("dark", x, x_hat, sigma=2.0)
    assert smooth.shape == x.shape and smooth[:, :, 7, 7].min() > smooth[:, :, 15, 15].max()


def test_ssim_map_equals_torchmetrics_inside_the_border():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, x_hat = _pair(1)
    ours = 1 - scoring.ssim_map(x, x_hat)  # Gaussian window of sigma 1.5, 11 taps
    _, full = tm.structural_similarity_index_measure(
        x_hat, x, data_range=2.0, sigma=1.5, return_full_image=True
    )
    assert torch.allclose(ours, full, atol=1e-4)


def test_residual_normaliser_recovers_per_intensity_spread():
    g = torch.Generator().manual_seed(0)
    x_hat = torch.rand(512, 1, 16, 16, generator=g) * 2 - 1
    std = 0.02 + 0.1 * (x_hat + 1)  # brighter tissue: larger residuals
    x = x_hat - 0.01 - std * torch.randn(x_hat.shape, generator=g)
    moments = scoring.residual_moments(x[:256], x_hat[:256]) + scoring.residual_moments(
        x[256:], x_hat[256:]
    )  # sums over batches
    norm = scoring.fit_residual_norm(moments)
    centres = (torch.arange(scoring.NORM_BINS) + 0.5) / scoring.NORM_BINS * 2 - 1
    assert torch.allclose(norm[0], torch.full_like(norm[0], 0.01), atol=0.015)
    assert torch.allclose(norm[1], 0.02 + 0.1 * (centres + 1), rtol=0.1)
    # 3 spreads darker than expected scores about 3 wherever it lies; brighter scores 0
    y = x_hat - 0.01 - 3 * std
    z = scoring.anomaly_map("dark_z", y, x_hat, norm)
    assert 2.5 < float(z.median()) < 3.5
    assert float(scoring.anomaly_map("dark_z", x_hat + 3 * std, x_hat, norm).max()) == 0
    assert float(scoring.anomaly_map("zscore", x_hat + 3 * std, x_hat, norm).median()) > 2.5
    # bins without enough pixels take the overall statistics
    sparse = scoring.residual_moments(x[:1, :, :2], x_hat[:1, :, :2])
    assert torch.isfinite(scoring.fit_residual_norm(sparse, min_count=4)).all()


def test_unfitted_normaliser_and_unknown_map_are_clear_errors():
    x, x_hat = _pair()
    nan = torch.full((2, scoring.NORM_BINS), math.nan)
    with pytest.raises(ValueError, match="fitted on training normals"):
        scoring.anomaly_map("dark_z", x, x_hat, nan)
    with pytest.raises(ValueError, match="expected one of"):
        scoring.anomaly_map("bright", x, x_hat)
    with pytest.raises(ValueError, match="feature layer"):
        scoring.anomaly_map("feature", x, x_hat)


@pytest.mark.parametrize("method", RECONSTRUCTION_METHODS)
def test_methods_fit_the_normaliser_and_score_every_map(method: str, tmp_path):
    """After fitting, the checkpoint holds the normaliser; every map of the method scores;
    pix2pix and Sparse-GAN also keep Sparse-GAN's AAM."""
    import hydra

    from anogan_lightning.data.synthetic import SyntheticOCTDataModule
    from anogan_lightning.train import run

    run(compose_cfg(tiny_overrides(method), tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run/checkpoints/model.ckpt", weights_only=False)
    norm = ckpt["state_dict"]["map_norm"]
    assert torch.isfinite(norm).all() and (norm[1] > 0).all()
    cls = hydra.utils.get_class(ckpt["anogan_lightning"]["class"])
    model = cls.load_from_checkpoint(tmp_path / "run/checkpoints/model.ckpt").eval()
    assert model.hparams.map == scoring.DEFAULT_MAP
    dm = SyntheticOCTDataModule(n_train=8, n_val=8, n_test=8, image_size=16, batch_size=8)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    kinds = scoring.ANOMALY_MAPS + (("aam",) if "pix2pix" in method or "sparse" in method else ())
    for kind in kinds:
        model.hparams.map = kind
        with torch.no_grad():
            amap = model.score(batch)["amap"]
        assert amap.shape == (8, 1, 16, 16) and torch.isfinite(amap).all(), kind
