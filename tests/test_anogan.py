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
    ds = make_split(5, 16, "test")
    z = model.start_z(ds.images, ds.ids)
    assert z.shape == (5, 16)
    cands = model.prior_draws(ds.ids, 6)  # (K, B, latent_dim)
    losses = torch.stack([_loss(model, ds.images, c) for c in cands])  # (K, B)
    torch.testing.assert_close(_loss(model, ds.images, z), losses.min(0).values)
    assert torch.equal(model.start_z(ds.images, ds.ids), z)  # reproducible


def test_start_depends_on_the_image_not_its_batch():
    model = AnoGAN(latent_dim=16, width=8, image_size=16, progress=False)
    ds = make_split(4, 16, "test")
    z = model.start_z(ds.images, ds.ids)
    assert z.abs().max() <= 1 and len({tuple(r.tolist()) for r in z}) == 4
    # the same image alone, or in another order, starts from the same z
    torch.testing.assert_close(model.start_z(ds.images[2:3], ds.ids[2:3]), z[2:3])
    torch.testing.assert_close(model.start_z(ds.images.flip(0), ds.ids[::-1]), z.flip(0))
    model.hparams.mapping_seed = 1
    assert not torch.equal(model.start_z(ds.images, ds.ids), z)
