"""aCAE: the autoencoder's depth matches AnoGAN's DCGAN, and AnoGAN's A(x) on a reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from anogan_lightning.methods.acae import ACAE
from anogan_lightning.nets.acae import ConvAutoencoder
from anogan_lightning.nets.dcgan import DCGANDiscriminator
from anogan_lightning.scoring import reconstruction_scores


def test_depth_and_channels_match_anogan():
    ae = ConvAutoencoder(100, 1, 64, 64)
    enc = [m for m in ae.encoder.modules() if isinstance(m, nn.Conv2d)]
    dec = [m for m in ae.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in enc] == [64, 128, 256, 512]
    assert [m.in_channels for m in dec] == [512, 256, 128, 64]
    assert all(m.kernel_size == (5, 5) for m in enc + dec)
    assert ae.encoder.head.out_features == 100


def test_shapes_and_every_parameter_gets_a_gradient():
    ae = ConvAutoencoder(8, 1, 4, 32)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    x_hat = ae(x)
    assert x_hat.shape == x.shape and x_hat.abs().max() <= 1
    (x_hat - x).abs().mean().backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reconstruction_scores():
    torch.manual_seed(0)
    d = DCGANDiscriminator(1, 4, 16).eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a0, r0, d0 = reconstruction_scores(d, x, x.clone(), lam=0.2)
        assert torch.equal(a0, torch.zeros(4)) and torch.equal(r0, torch.zeros(4))
        noise = torch.randn_like(x)
        small = reconstruction_scores(d, x, x + 0.05 * noise, lam=0.2)
        large = reconstruction_scores(d, x, x + 0.5 * noise, lam=0.2)
    assert (large[0] > small[0]).all() and (large[1] > small[1]).all()
    torch.testing.assert_close(small[0], 0.8 * small[1] + 0.2 * small[2])
    torch.testing.assert_close(small[1], (0.05 * noise).abs().flatten(1).sum(1))


def test_acae_score_is_a_on_its_own_reconstruction():
    torch.manual_seed(0)
    model = ACAE(latent_dim=8, width=4, image_size=16, lambda_score=0.25, map="residual").eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.inference_mode():
        out = model.score({"x": x})
        x_hat = model.autoencoder(x)
    torch.testing.assert_close(out["x_hat"], x_hat)
    torch.testing.assert_close(out["residual"], (x - x_hat).abs().flatten(1).sum(1))
    torch.testing.assert_close(out["score"], 0.75 * out["residual"] + 0.25 * out["discrimination"])
    assert out["amap"].shape == (4, 1, 16, 16)
    torch.testing.assert_close(out["pd"], -model.discriminator(x))


def test_training_ends_with_the_discriminator_recalibrated_on_real_images():
    """D saw reconstructions twice per step; after the fit its batch-norm statistics are those
    of the real training batch (D in train mode), and the autoencoder is not touched by it."""
    import pytorch_lightning as pl
    from test_anogan import _batch_stats, _fit
    from torch.utils.data import DataLoader

    from anogan_lightning.data.synthetic import make_split

    pl.seed_everything(0)
    batch = next(iter(DataLoader(make_split(16, 16, "train", seed=2), batch_size=16)))
    model = ACAE(latent_dim=8, width=4, image_size=16, calibration_batches=1)
    _fit(model, [batch] * 3, 6)
    assert bool(model.discriminator.calibrated)
    ((mean, var),) = _batch_stats(model.discriminator, batch["x"])
    bn = model.discriminator.blocks[1][1]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    ae_state = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    model.discriminator.calibrated.fill_(False)
    model.calibrate_discriminator([batch])
    for k, v in model.autoencoder.state_dict().items():
        assert torch.equal(v, ae_state[k]), k
