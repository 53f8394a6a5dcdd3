"""Sparse-GAN parts: the Sparsity Regularization Net on a synthetic sparse-coding problem, E sharing
G_en's weights, the Anomaly Activation Map, and the encoder-decoder's shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.methods.autoencoder import AutoEncoder
from anogan_lightning.methods.pix2pix import Pix2Pix
from anogan_lightning.methods.sparse_gan import SparseGAN, scale_normalise
from anogan_lightning.nets.pix2pix import EncoderDecoder, PatchDiscriminator, n_stages
from anogan_lightning.nets.srn import SparsityRegularizationNet, soft_threshold
from anogan_lightning.scoring import anomaly_activation_map, latent_stats

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
    model = SparseGAN(width=4, image_size=32, map="aam", decode_from="latent").eval()  # G_de(H_in)
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
    model = SparseGAN(  # the paper-literal reading; train mode: batch stats
        width=4,
        image_size=16,
        decode_from="code",
        sparsity_mode="paper",
        lambda_sp=50.0,
        map="aam",  # an untrained model has no residual normaliser for dark_z
    )
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


# -- the latent's scale: logging, scale-free sparsity, latent consistency (issue 11, item 3) -----


class _Metrics(pl.Callback):
    """The logged training metrics after every batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _train_on_fixed_batch(model: pl.LightningModule, steps: int) -> list[dict[str, float]]:
    pl.seed_everything(0)
    batch = next(iter(DataLoader(make_split(16, 16, "train", seed=2), batch_size=16)))
    metrics = _Metrics()
    trainer = pl.Trainer(
        max_steps=2 * steps,  # two optimizers: Lightning counts both updates
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics],
    )
    trainer.fit(model, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return metrics.steps


def test_latent_stats_values():
    h = torch.tensor([[0.0, 2.0], [0.0, 4.0]])  # 2 images, 2 features
    stats = latent_stats(h)
    assert float(stats["train/h_energy"]) == pytest.approx((4 + 16) / 4)
    assert float(stats["train/h_zeros"]) == pytest.approx(0.5)
    assert float(stats["train/h_between_var"]) == pytest.approx((0 + 2.0) / 2)  # var(2, 4) = 2


MODES = [
    {},  # the defaults
    {"sparsity_mode": "paper", "lambda_lat": 0.0, "lambda_sp": 50.0},  # paper-literal
    {"sparsity_mode": "scaled", "lambda_lat": 0.0},
    {"sparsity_mode": "split", "lambda_lat": 0.0},
    {"sparsity_mode": "scaled", "decode_from": "code", "lambda_lat": 0.0},
    {"sparsity_mode": "split", "decode_from": "code", "lambda_lat": 0.0},
]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", MODES, ids=lambda k: "-".join(map(str, k.values())) or "default")
def test_each_mode_trains_and_logs_the_latent(kwargs):
    model = SparseGAN(width=4, image_size=16, **kwargs)
    steps = _train_on_fixed_batch(model, 30)
    for key in ("train/h_energy", "train/h_zeros", "train/h_between_var", "train/loss_sp"):
        assert all(key in s and math.isfinite(s[key]) for s in steps), key
    assert ("train/loss_lat" in steps[-1]) == (kwargs.get("lambda_lat", 1.0) > 0)
    re = [s["train/loss_re"] for s in steps]
    assert sum(re[-3:]) < sum(re[:3]), re
    assert 0 <= steps[-1]["train/h_zeros"] <= 1 and steps[-1]["train/h_energy"] > 0


def test_pix2pix_logs_the_latent_and_latent_consistency_trains():
    steps = _train_on_fixed_batch(Pix2Pix(width=4, image_size=16, lambda_lat=1.0), 30)
    assert {"train/h_energy", "train/h_zeros", "train/h_between_var"} <= set(steps[-1])
    lat = [s["train/loss_lat"] for s in steps]
    assert sum(lat[-3:]) < sum(lat[:3]), lat
    assert "train/loss_lat" not in _train_on_fixed_batch(Pix2Pix(width=4, image_size=16), 2)[-1]


@pytest.mark.parametrize("mode", ["scaled", "split"])
def test_scale_free_sparsity_loss_ignores_the_scale_of_h(mode):
    """L_sp(c H) = L_sp(H): shrinking H_in cannot lower it (the paper-literal mode's can)."""
    torch.manual_seed(0)
    model = SparseGAN(width=4, image_size=16, sparsity_mode=mode)
    paper = SparseGAN(width=4, image_size=16, sparsity_mode="paper")
    paper.srn.load_state_dict(model.srn.state_dict())
    h = torch.rand(4, model.srn.in_channels, 4, 4)
    with torch.no_grad():
        ref = model.sparsity_loss(h)[0]
        for c in (0.01, 0.3, 10.0):
            torch.testing.assert_close(model.sparsity_loss(c * h)[0], ref, rtol=1e-4, atol=1e-6)
        literal = [float(paper.sparsity_loss(c * h)[0]) for c in (0.01, 1.0, 10.0)]
    assert literal[0] < literal[1] < literal[2]  # paper: L_sp falls as H_in shrinks


def test_split_mode_trains_the_srn_on_its_own_objective():
    """ "split" (decoder reading H_in): S and W_d get the gradient of L_scl at sg(H); G_en gets
    a gradient too."""
    torch.manual_seed(0)
    model = SparseGAN(width=4, image_size=16, sparsity_mode="split", decode_from="latent")
    h = torch.rand(4, model.srn.in_channels, 4, 4, requires_grad=True)
    loss, _ = model.sparsity_loss(h)
    srn_params = list(model.srn.parameters())
    grads = torch.autograd.grad(loss, [h, *srn_params], allow_unused=True)
    hn = scale_normalise(h.detach())
    ref = torch.autograd.grad(
        model.srn.objective(hn, model.srn(hn)).mean(), srn_params, allow_unused=True
    )
    for g, r in zip(grads[1:], ref, strict=True):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, r)
    assert grads[0].abs().sum() > 0  # G_en is still pulled towards its sparse approximation
    with pytest.raises(ValueError, match="sparsity_mode"):
        SparseGAN(width=4, image_size=16, sparsity_mode="l1")


def test_split_with_code_decoding_leaves_h_unconstrained():
    """ "split" + decode_from="code": L_sp gives G_en no gradient (only the SRN's L_scl at
    sg(H / rms)), and the decoder reads W_d S(H / rms) of the live H, so the reconstruction's
    gradient reaches G_en through the code."""
    torch.manual_seed(0)
    model = SparseGAN(width=4, image_size=16, sparsity_mode="split", decode_from="code")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    x_hat, h_in, code = model.generate(x)
    loss, logs = model.extra_generator_loss(h_in, code)
    enc = list(model.generator.encoder.parameters())
    assert all(
        g is None for g in torch.autograd.grad(loss, enc, allow_unused=True, retain_graph=True)
    )
    hn = scale_normalise(h_in.detach())
    torch.testing.assert_close(
        loss, model.hparams.lambda_sp * model.srn.objective(hn, model.srn(hn)).mean()
    )
    torch.testing.assert_close(
        x_hat, model.generator.decoder(model.srn.reconstruct(model.srn(scale_normalise(h_in))))
    )
    grads = torch.autograd.grad(x_hat.sum(), enc, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_encode_fake_leaves_running_statistics_alone():
    model = Pix2Pix(width=4, image_size=16, lambda_lat=1.0).train()
    bn = [m for m in model.E.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    h_re = model.encode_fake(x)
    assert h_re.requires_grad
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bn, strict=True))
    assert all(m.momentum == 0.1 for m in bn)
    model.E(x)
    assert not all(torch.equal(a, m.running_mean) for a, m in zip(before, bn, strict=True))


def test_yaml_defaults_match_the_class_defaults():
    """conf/method/sparse_gan.yaml and SparseGAN() give the same reading (module docstring)."""
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(
        Path(__file__).parents[1] / "anogan_lightning/conf/method/sparse_gan.yaml"
    ).method
    hp = SparseGAN(width=4, image_size=16).hparams
    for key in ("sparsity_mode", "lambda_lat", "lambda_sp", "decode_from", "alpha"):
        assert yaml[key] == hp[key], key
    assert (hp.sparsity_mode, hp.lambda_sp, hp.lambda_lat) == ("split", 5.0, 1.0)
    assert hp.decode_from == "code"


def test_sparse_gan_default_map_and_the_aam(tmp_path):
    """The default map is the reconstruction methods' (dark_z); map=aam is the paper's
    Anomaly Activation Map (eq. 8) of G_en(x) and E(G(x))."""
    from anogan_lightning.scoring import DEFAULT_MAP

    assert SparseGAN(width=4, image_size=32).hparams.map == DEFAULT_MAP
    model = SparseGAN(width=4, image_size=32, map="aam").eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.score({"x": x})
        h_in = model.generator.encoder(x)
        h_re = model.generator.encoder(model.generator.decoder(h_in))
    torch.testing.assert_close(out["amap"], anomaly_activation_map(h_in, h_re, (32, 32)))
