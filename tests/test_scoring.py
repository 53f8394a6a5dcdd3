"""AnoGAN's latent mapping and scores, on random tensors without a Trainer."""

from __future__ import annotations

import pytest
import torch

from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z
from anogan_lightning.scoring import frozen, map_latent, residual_map


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, channels=1, width=8, image_size=16)
    d = DCGANDiscriminator(channels=1, width=8, image_size=16, feature_layer=-2)
    # a few training-mode passes so the BatchNorm running statistics are not the identity
    with torch.no_grad():
        for _ in range(5):
            d(g(sample_uniform_z(32, 16)))
    return g, d


def _target(g, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = sample_uniform_z(n, 16, generator=torch.Generator().manual_seed(seed))
    with frozen(g), torch.no_grad():
        return z, g(z)


def test_mapping_lowers_its_loss(nets):
    g, d = nets
    _, x = _target(g, 8, 1)
    z0 = sample_uniform_z(8, 16, generator=torch.Generator().manual_seed(2))
    m = map_latent(g, d, x, z0, steps=40, lam=0.1, lr=0.05)
    assert m.loss_history.shape == (41,)
    assert m.loss_history[-1] < 0.7 * m.loss_history[0]
    assert m.z.shape == (8, 16) and m.x_hat.shape == x.shape
    assert m.z.abs().max() <= 1  # kept in the prior's support
    assert torch.allclose(m.score, 0.9 * m.residual + 0.1 * m.discrimination)
    assert g.training and d.training  # state restored
    assert all(p.requires_grad for p in g.parameters())


def test_identical_input_scores_zero(nets):
    g, d = nets
    z, x = _target(g, 4, 3)
    m = map_latent(g, d, x, z, steps=5)
    assert torch.allclose(m.score, torch.zeros(4), atol=1e-4)
    assert torch.allclose(residual_map(x, m.x_hat), torch.zeros(4, 1, 16, 16), atol=1e-5)


def test_larger_perturbation_scores_higher(nets):
    g, d = nets
    z, x = _target(g, 6, 4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    scores = []
    for eps in (0.0, 0.1, 0.4):
        m = map_latent(g, d, (x + eps * noise).clamp(-1, 1), z, steps=10, lr=0.01)
        scores.append(m.score)
    assert torch.all(scores[0] < scores[1]) and torch.all(scores[1] < scores[2])


def test_batched_equals_one_by_one(nets):
    g, d = nets
    _, x = _target(g, 6, 6)
    x = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))).clamp(-1, 1)
    z0 = sample_uniform_z(6, 16, generator=torch.Generator().manual_seed(8))
    batched = map_latent(g, d, x, z0, steps=25, lr=0.05)
    for i in range(6):
        single = map_latent(g, d, x[i : i + 1], z0[i : i + 1], steps=25, lr=0.05)
        torch.testing.assert_close(single.score, batched.score[i : i + 1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(single.z, batched.z[i : i + 1], rtol=1e-3, atol=1e-3)


def test_refuses_inference_mode(nets):
    g, d = nets
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        map_latent(g, d, torch.zeros(1, 1, 16, 16), torch.zeros(1, 16), steps=1)
