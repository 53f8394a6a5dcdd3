"""Networks: output shapes and that one backward pass reaches every parameter."""

from __future__ import annotations

import pytest
import torch

from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z


@pytest.mark.parametrize("image_size", [8, 16, 32, 64])
def test_dcgan_shapes(image_size: int):
    g = DCGANGenerator(latent_dim=10, channels=1, width=4, image_size=image_size)
    d = DCGANDiscriminator(channels=1, width=4, image_size=image_size, feature_layer=-1)
    z = sample_uniform_z(3, 10)
    x = g(z)
    assert x.shape == (3, 1, image_size, image_size)
    assert x.min() >= -1 and x.max() <= 1
    logit, feat = d.forward_with_features(x)
    assert logit.shape == (3,)
    n = len(d.blocks)
    assert feat.shape == (3, 4 * 2 ** (n - 1), 4, 4)
    assert torch.equal(d(x), logit)


def test_paper_size_channels():
    """AnoGAN's grayscale DCGAN: 4 + 4 layers, 512-256-128-64 channels, 5x5 kernels at 64x64."""
    g = DCGANGenerator(100, 1, 64, 64)
    d = DCGANDiscriminator(1, 64, 64)
    deconv = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    conv = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.in_channels for m in deconv] == [512, 256, 128, 64]
    assert [m.out_channels for m in conv] == [64, 128, 256, 512]
    assert all(m.kernel_size == (5, 5) for m in deconv + conv)


def test_every_parameter_gets_a_gradient():
    g = DCGANGenerator(8, 1, 4, 16)
    d = DCGANDiscriminator(1, 4, 16, feature_layer=1)
    logit, feat = d.forward_with_features(g(sample_uniform_z(4, 8)))
    (logit.sum() + feat.sum()).backward()
    for name, p in list(g.named_parameters()) + list(d.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        DCGANGenerator(8, 1, 4, 48)
    with pytest.raises(ValueError, match="feature_layer"):
        DCGANDiscriminator(1, 4, 16, feature_layer=5)
