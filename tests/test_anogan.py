"""AnoGAN specifics: best-of-K start, PD sign, the mapping inside the module."""

from __future__ import annotations

import torch

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.methods.anogan import AnoGAN
from anogan_lightning.scoring import l1_per_sample


def _loss(model: AnoGAN, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    g, d = model.generator.eval(), model.discriminator.eval()
    with torch.no_grad():
        x_hat = g(z)
        lam = model.hparams.lambda_fm
        f_x, f_hat = d.forward_with_features(x)[1], d.forward_with_features(x_hat)[1]
        return (1 - lam) * l1_per_sample(x, x_hat) + lam * l1_per_sample(f_x, f_hat)


def test_restarts_start_from_the_best_draw():
    torch.manual_seed(0)
    model = AnoGAN(latent_dim=16, width=8, image_size=16, mapping_restarts=6, progress=False)
    x = make_split(5, 16, "test").images
    z = model.start_z(x, batch_idx=3)
    assert z.shape == (5, 16)
    cands = model.initial_z(6 * 5, 3).view(6, 5, 16)
    losses = torch.stack([_loss(model, x, c) for c in cands])  # (K, B)
    torch.testing.assert_close(_loss(model, x, z), losses.min(0).values)
    assert torch.equal(model.start_z(x, batch_idx=3), z)  # reproducible


def test_single_start_is_the_seeded_prior_draw():
    model = AnoGAN(latent_dim=16, width=8, image_size=16, progress=False)
    x = make_split(4, 16, "test").images
    assert torch.equal(model.start_z(x, 0), model.initial_z(4, 0))
    assert not torch.equal(model.initial_z(4, 0), model.initial_z(4, 1))
    assert model.initial_z(4, 0).abs().max() <= 1
