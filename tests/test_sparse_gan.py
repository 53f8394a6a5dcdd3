"""Sparse-GAN parts: the Sparsity Regularization Net on a synthetic sparse-coding problem, E sharing
G_en's weights, the Anomaly Activation Map, and the encoder-decoder's shapes."""

from __future__ import annotations

import pytest
import torch

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.methods.autoencoder import AutoEncoder
from anogan_lightning.methods.pix2pix import Pix2Pix
from anogan_lightning.methods.sparse_gan import SparseGAN
from anogan_lightning.nets.pix2pix import EncoderDecoder, PatchDiscriminator, n_stages
from anogan_lightning.nets.srn import SparsityRegularizationNet, soft_threshold
from anogan_lightning.scoring import anomaly_activation_map

C, K, ACTIVE = 16, 32, 2  # feature channels, atoms, non-zeros per ground-truth code


@pytest.fixture(scope="module")
def coding_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dictionary (C, K) with unit atoms, codes (N, K, 2, 2) with ACTIVE non-zeros, H = W_d s)."""
    gen = torch.Generator().manual_seed(0)
    w_d = torch.randn(C, K, generator=gen)
    w_d = w_d / w_d.norm(dim=0)
    n = 64
    codes = torch.zeros(n * 4, K)
    for row in codes:
        idx = torch.randperm(K, generator=gen)[:ACTIVE]
        sign = torch.randint(0, 2, (ACTIVE,), generator=gen) * 2 - 1
        row[idx] = sign * (1 + torch.rand(ACTIVE, generator=gen))
    h = (codes @ w_d.T).view(n, 2, 2, C).permute(0, 3, 1, 2).contiguous()  # (N, C, 2, 2)
    return w_d, codes.view(n, 2, 2, K).permute(0, 3, 1, 2), h


def _relative_error(srn: SparsityRegularizationNet, h: torch.Tensor, s: torch.Tensor) -> float:
    return float((h - srn.reconstruct(s)).pow(2).sum() / h.pow(2).sum())  # zero codes: 1


def test_soft_threshold_gives_exact_zeros():
    c = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    torch.testing.assert_close(
        soft_threshold(c, torch.tensor(0.5)), torch.tensor([-1.5, 0, 0, 0, 1.0])
    )


def test_srn_at_ista_init_more_steps_reconstruct_better(coding_problem):
    w_d, _, h = coding_problem
    srn = SparsityRegularizationNet(C, K, steps=3, kernel_size=3, alpha=0.2)
    srn.init_ista(w_d)
    torch.testing.assert_close(srn.atoms(), w_d)
    with torch.no_grad():
        errors = [_relative_error(srn, h, srn(h, steps=t)) for t in (1, 3, 10, 40)]
        objective = [float(srn.objective(h, srn(h, steps=t)).mean()) for t in (1, 3, 10, 40)]
        s = srn(h, steps=40)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert all(a > b for a, b in zip(objective, objective[1:], strict=False)), objective
    assert errors[-1] < 0.1, errors  # zero codes give 1
    assert (s == 0).float().mean() > 0.8  # ground truth: 30 of 32 zero


def test_trained_srn_codes_sparse_and_beat_ista(coding_problem):
    """Trained briefly (dictionary fixed) on the objective, 3 steps beat 3 ISTA steps."""
    torch.manual_seed(0)
    w_d, _, h = coding_problem
    srn = SparsityRegularizationNet(C, K, steps=3, kernel_size=1, alpha=0.2)
    srn.init_ista(w_d)
    with torch.no_grad():
        ista3 = float(srn.objective(h, srn(h)).mean())
    srn.dictionary.requires_grad_(False)
    opt = torch.optim.Adam([p for p in srn.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(150):
        loss, _ = srn.loss(h)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        s = srn(h)
        trained3 = float(srn.objective(h, s).mean())
        error = _relative_error(srn, h, s)
    assert trained3 < 0.85 * ista3, (trained3, ista3)
    assert (s == 0).float().mean() > 0.5, "most code entries must be exactly zero"
    assert error < 0.15, error  # zero codes: 1


def test_srn_gradients_reach_every_parameter(coding_problem):
    _, _, h = coding_problem
    srn = SparsityRegularizationNet(C, K, steps=2, kernel_size=3, alpha=0.2)
    h = h.clone().requires_grad_(True)
    loss, code = srn.loss(h)
    assert loss.shape == (len(h),) and code.shape == (len(h), K, 2, 2)
    loss.sum().backward()
    for name, p in srn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert h.grad.abs().sum() > 0  # L_sp reaches G_en through H_in


@pytest.mark.parametrize("cls", [Pix2Pix, SparseGAN])
def test_encoder_e_shares_g_en_weights(cls):
    model = cls(width=4, image_size=16)
    g_en = model.generator.encoder
    assert model.E is g_en
    e_params, g_params = list(model.E.parameters()), list(g_en.parameters())
    assert e_params and all(a is b for a, b in zip(e_params, g_params, strict=True))
    # one parameter set: E adds nothing to the model's parameters or state
    n_gen = sum(p.numel() for p in model.generator.parameters())
    n_rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("generator."))
    assert sum(p.numel() for p in model.parameters()) == n_gen + n_rest
    assert not any(k.startswith("E.") for k in model.state_dict())
    # H_re = E(G(x)) is what the latent score compares, and training G_en changes E with it
    model.eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        f = model.forward_scores(x)
        torch.testing.assert_close(f["h_re"], g_en(f["x_hat"]))
        g_en.net[0].weight.add_(0.5)  # an update of G_en's first convolution
        assert not torch.allclose(model.E(f["x_hat"]), f["h_re"])


def test_aam_shape_and_peak_where_features_differ():
    torch.manual_seed(0)
    h_in = torch.rand(3, 8, 7, 7) * 0.1
    h_re = h_in.clone()
    h_in[0, 5, 2, 4] += 5.0  # image 0: channel 5 differs at (2, 4)
    h_in[1, 1, 6, 0] += 5.0  # image 1: channel 1 differs at (6, 0)
    amap = anomaly_activation_map(h_in, h_re)
    assert amap.shape == (3, 1, 7, 7)
    assert divmod(int(amap[0, 0].argmax()), 7) == (2, 4)
    assert divmod(int(amap[1, 0].argmax()), 7) == (6, 0)
    assert torch.count_nonzero(amap[2]) == 0  # identical features: w = 0, no activation
    up = anomaly_activation_map(h_in, h_re, (224, 224))
    assert up.shape == (3, 1, 224, 224)
    row, col = divmod(int(up[0, 0].argmax()), 224)
    assert abs(row - (2 + 0.5) * 32) <= 32 and abs(col - (4 + 0.5) * 32) <= 32  # same cell


def test_sparse_gan_score_outputs():
    model = SparseGAN(width=4, image_size=32).eval()
    batch = {"x": torch.rand(5, 1, 32, 32) * 2 - 1, "label": torch.zeros(5), "id": ["a"] * 5}
    x = batch["x"]
    with torch.no_grad():
        out = model.score(batch)
        h_in = model.generator.encoder(x)
        x_hat = model.generator.decoder(h_in)
        h_re = model.generator.encoder(x_hat)
    assert out["score"].shape == (5,)
    torch.testing.assert_close(out["score"], out["latent"])  # the latent score, eq. 4
    torch.testing.assert_close(out["latent"], (h_in - h_re).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(out["image"], (x - x_hat).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(out["amap"], anomaly_activation_map(h_in, h_re, (32, 32)))
    assert out["x_hat"].shape == (5, 1, 32, 32)


def test_autoencoder_scores_what_it_did_not_learn_higher():
    """A few steps on one batch of normal B-scans: the auto-encoder's reconstruction-error score
    (mean squared error of G(x)) then ranks that batch below noise images, and below the same
    scans with a bright square pasted in; ``score`` is the error of its own reconstruction."""
    torch.manual_seed(0)
    model = AutoEncoder(width=8, image_size=16, map="residual")
    normal = make_split(16, 16, "train", seed=3).images
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x_hat, _ = model.generator(normal)
        loss = (normal - x_hat).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lesion = normal.clone()
    lesion[:, :, 4:10, 4:10] = 1.0
    noise = torch.rand_like(normal) * 2 - 1
    model.eval()
    with torch.no_grad():
        scores = {k: model.score({"x": v})["score"] for k, v in
                  (("normal", normal), ("lesion", lesion), ("noise", noise))}  # fmt: skip
        x_hat = model.generator(normal)[0]
    torch.testing.assert_close(scores["normal"], (normal - x_hat).pow(2).flatten(1).mean(1))
    assert scores["normal"].max() < scores["noise"].min()
    assert scores["normal"].max() < scores["lesion"].min()  # (untrained: normal > noise)


@pytest.mark.parametrize(("size", "side", "stages"), [(224, 7, 5), (64, 4, 4), (16, 4, 2)])
def test_encoder_decoder_shapes(size: int, side: int, stages: int):
    assert n_stages(size) == stages
    g = EncoderDecoder(channels=1, width=2, image_size=size)
    x = torch.rand(2, 1, size, size) * 2 - 1
    x_hat, h = g(x)
    assert x_hat.shape == x.shape and h.shape == (2, 2 * 2 ** (stages - 1), side, side)
    assert h.min() >= 0 and x_hat.abs().max() <= 1
    assert PatchDiscriminator(1, 2, size)(x).shape == (2, side * side)


def test_paper_latent_shape():
    """width 64 at 224 x 224: H_in is 1024 x 7 x 7 (Sparse-GAN sec. 2.4)."""
    g = EncoderDecoder(channels=1, width=64, image_size=224)
    convs = [m for m in g.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1024]
    assert g.encoder.out_size == 7


def test_bad_image_size():
    with pytest.raises(ValueError, match="halve"):
        n_stages(100)


def test_decode_from_code_reconstructs_through_the_sparse_code():
    """decode_from="code": G_de reads W_d S(H_in), so the dictionary shapes the reconstruction
    and L_sp is the objective at the code the decoder read."""
    torch.manual_seed(0)
    model = SparseGAN(width=4, image_size=16, decode_from="code")  # train mode: batch stats
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        x_hat, h_in, code = model.generate(x)
        assert (code != 0).any() and (code == 0).any()
        torch.testing.assert_close(x_hat, model.generator.decoder(model.srn.reconstruct(code)))
        loss, logs = model.extra_generator_loss(h_in, code)
        torch.testing.assert_close(loss, 50.0 * model.srn.objective(h_in, code).mean())
        model.srn.dictionary.mul_(-1.0)
        assert not torch.allclose(model.generate(x)[0], x_hat)  # the decoder sees the code
        out = model.eval().score({"x": x})
    assert out["score"].shape == (3,) and torch.isfinite(out["score"]).all()
    with pytest.raises(ValueError, match="decode_from"):
        SparseGAN(width=4, image_size=16, decode_from="sparse")
