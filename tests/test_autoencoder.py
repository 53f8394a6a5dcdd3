"""The auto-encoder's denoising option: coarse noise, a clean target, a clean scoring input."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from anogan_lightning import method_config
from anogan_lightning.methods.autoencoder import AutoEncoder, coarse_noise


def test_coarse_noise_is_smooth_at_its_grid_scale_and_has_its_spread():
    torch.manual_seed(0)
    x = torch.zeros(256, 1, 64, 64)
    n = coarse_noise(x, 0.5, 8)
    assert n.shape == x.shape and n.dtype == x.dtype
    # a node's value is drawn with std 0.5; bilinear mixing between nodes lowers it, not below 0.25
    assert 0.25 < float(n.std()) < 0.5
    assert abs(float(n.mean())) < 0.02
    step = (n[..., 1:] - n[..., :-1]).std() / n.std()  # neighbours 1 px apart: nearly equal
    assert float(step) < 0.3

    # pixels a grid cell (8 px) apart are less alike than neighbours, 4 cells apart unrelated
    def corr(d: int) -> float:
        a, b = n[..., :-d].flatten(), n[..., d:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert corr(1) > 0.9 > corr(8) and abs(corr(32)) < 0.05
    assert torch.equal(coarse_noise(x, 0.0, 8), x)
    with pytest.raises(ValueError, match="noise_res"):
        coarse_noise(x, 0.5, 0)


def test_denoising_training_corrupts_the_input_and_targets_the_clean_image():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    seen = []
    for std in (0.0, 0.3):
        model = AutoEncoder(width=4, image_size=16, noise_std=std, noise_res=4, map="residual")
        model.log = lambda *a, **k: None
        inputs = []
        hook = model.generator.register_forward_pre_hook(
            lambda m, a, store=inputs: store.append(a[0].clone())
        )
        loss = model.training_step({"x": x}, 0)
        model.score({"x": x})
        hook.remove()
        x_hat, _ = model.generator(inputs[0])
        assert torch.allclose(loss, (x - x_hat).abs().mean(), atol=1e-6)  # target: the clean x
        seen.append(inputs[0])
        assert torch.equal(inputs[1], x)  # scoring reads the clean input
    assert torch.equal(seen[0], x)
    assert float((seen[1] - x).std()) > 0.1
    with pytest.raises(ValueError, match="noise_std"):
        AutoEncoder(width=4, image_size=16, noise_std=-0.1)


def test_denoising_config_is_the_autoencoders_but_for_noise_and_map():
    """Through its defaults list: the keys it does not set are autoencoder.yaml's."""
    ae, dae = (
        OmegaConf.to_container(method_config(m), resolve=False)
        for m in ("autoencoder", "denoising_autoencoder")
    )
    assert set(ae) == set(dae)
    differ = {k for k in ae if ae[k] != dae[k]}
    assert differ == {"noise_std", "map"} and dae["noise_std"] > 0
