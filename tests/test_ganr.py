"""GANR: the reference discrimination loss, its latent mapping, and scoring the networks of an
AnoGAN checkpoint through the entry point without training."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import check_results_against_scores, compose_cfg, tiny_overrides
from torch.utils.data import DataLoader

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.losses import reference_discrimination_loss
from anogan_lightning.methods.anogan import AnoGAN
from anogan_lightning.methods.ganr import GANR
from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z
from anogan_lightning.scoring import frozen, l1_per_sample, map_latent_reference
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_reference_loss_is_sigmoid_cross_entropy_against_real():
    logit = torch.tensor([0.0, 2.0, -1.0])
    # -log σ(l) by hand: log 2, log(1 + e^-2), log(1 + e)
    expected = torch.tensor([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.e)])
    torch.testing.assert_close(reference_discrimination_loss(logit), expected)
    bce = F.binary_cross_entropy_with_logits(logit, torch.ones(3), reduction="none")
    torch.testing.assert_close(reference_discrimination_loss(logit), bce)


def test_reference_mapping_score_and_descent():
    torch.manual_seed(0)
    g, d = DCGANGenerator(8, 1, 4, 16), DCGANDiscriminator(1, 4, 16)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = sample_uniform_z(3, 8)
    m0 = map_latent_reference(g, d, x, z, steps=0, lam=0.3)
    with frozen(g, d), torch.no_grad():  # Â = (1 - λ)·Σ|x - G(z)| + λ·(-log σ(D(G(z))))
        x_hat = g(z)
        r = l1_per_sample(x, x_hat)
        d_ref = -F.logsigmoid(d(x_hat))
    torch.testing.assert_close(m0.residual, r)
    torch.testing.assert_close(m0.discrimination, d_ref)
    torch.testing.assert_close(m0.score, 0.7 * r + 0.3 * d_ref)
    m = map_latent_reference(g, d, x, z, steps=15, lam=0.3, lr=0.05)
    assert m.loss_history[-1] < m.loss_history[0]
    assert m.z.abs().max() <= 1


def test_ganr_scores_an_anogan_checkpoint_without_training(tmp_path: Path):
    pl.seed_everything(0)
    anogan = AnoGAN(latent_dim=16, width=8, image_size=16, progress=False)
    batch = next(iter(DataLoader(make_split(16, 16, "train", seed=2), batch_size=16)))
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(anogan, DataLoader([batch] * 2, batch_size=None))
    ckpt = tmp_path / "anogan.ckpt"
    trainer.save_checkpoint(ckpt)

    out = tmp_path / "ganr"
    cfg = compose_cfg(tiny_overrides("ganr") + [f"method.from_checkpoint={ckpt}"], out)
    results = run(cfg)
    check_results_against_scores(out, results)
    assert {"test/auroc_residual", "test/auroc_discrimination_ref", "test/auroc_pd"} <= set(results)
    state = torch.load(out / "checkpoints/model.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 0  # the fit skipped training
    for k, v in anogan.state_dict().items():
        if k.startswith(("generator.", "discriminator.")):
            assert torch.equal(state["state_dict"][k], v), k

    with pytest.raises(ValueError, match="width: checkpoint 8 vs config 4"):
        GANR(latent_dim=16, width=4, image_size=16).load_gan(str(ckpt))
    with pytest.raises(FileNotFoundError, match="method.from_checkpoint: checkpoint .* not exist"):
        GANR(latent_dim=16, width=8, image_size=16).load_gan(str(tmp_path / "missing.ckpt"))


def test_lambda_score_weights_the_ganr_score():
    """λ = lambda_score is the weight of D̂ in Â = (1 - λ)·R + λ·D̂ (AnoGAN's lambda_fm name,
    a feature-matching weight there, is not a GANR hyperparameter)."""
    torch.manual_seed(0)
    model = GANR(latent_dim=8, width=4, image_size=16, lambda_score=0.3, mapping_steps=2)
    model.hparams.progress = False
    assert "lambda_fm" not in model.hparams and "lambda_fm" not in model.hparams_initial
    ds = make_split(3, 16, "test")
    out = model.eval().score({"x": ds.images, "id": ds.ids})
    torch.testing.assert_close(
        out["score"], 0.7 * out["residual"] + 0.3 * out["discrimination_ref"]
    )


# -- one configuration for AnoGAN and GAN_R -------------------------------------------------------
OWN_KEYS = {"_target_", "lambda_fm", "lambda_score", "from_checkpoint", "require_checkpoint"}


@pytest.mark.parametrize(
    ("anogan", "other", "differ"),
    [
        ("+method=anogan", "+method=ganr", set()),
        ("+experiment=ipmi2017_anogan", "+experiment=ipmi2017_ganr", set()),
        ("+experiment=ipmi2017_anogan", "+experiment=ipmi2017_pd", {"mapping_steps", "score_name"}),
    ],
)
def test_anogan_and_its_comparisons_share_one_configuration(anogan, other, differ, tmp_path):
    """Same DCGAN, training, data and mapping; only the discrimination term (and for P_D the
    headline and Γ) differ. λ is one value under each method's name."""
    a = compose_cfg([anogan], tmp_path)
    b = compose_cfg([other], tmp_path)
    lam = lambda m: m.get("lambda_fm", m.get("lambda_score"))  # noqa: E731
    assert lam(a.method) == lam(b.method) == 0.1
    keys = (set(a.method) | set(b.method)) - OWN_KEYS - differ
    mismatch = {
        k: (a.method.get(k), b.method.get(k)) for k in keys if a.method.get(k) != b.method.get(k)
    }
    assert not mismatch
    assert a.data == b.data
    # conf/method/anogan.yaml's demo trainer.max_epochs (set for the method, not the comparison)
    trainer = lambda c: {k: v for k, v in c.trainer.items() if k != "max_epochs"}  # noqa: E731
    assert trainer(a) == trainer(b)
    if anogan.startswith("+experiment"):
        assert a.trainer == b.trainer


def test_ipmi2017_configs_hold_the_paper_settings(tmp_path):
    for row in ("anogan", "ganr", "pd", "acae"):
        cfg = compose_cfg([f"+experiment=ipmi2017_{row}"], tmp_path)
        m = cfg.method
        assert (m.width, m.latent_dim, m.image_size, cfg.data.image_size) == (64, 100, 64, 64)
        assert cfg.data._target_.endswith("OCTVolumeDataModule") and cfg.data.flatten
        assert (m.lr, list(m.betas), cfg.trainer.max_epochs) == (2e-4, [0.5, 0.999], 20)
        if row != "acae":
            assert (m.mapping_restarts, m.real_label) == (1, 1.0)
            assert m.mapping_steps == (0 if row == "pd" else 500)


def test_ipmi2017_pd_headline_is_pd(tmp_path):
    cfg = compose_cfg(["+experiment=ipmi2017_pd", "method.width=4", "data.image_size=16"], tmp_path)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    model.hparams.progress = False
    ds = make_split(4, 16, "test")
    out = model.eval().score({"x": ds.images, "id": ds.ids})
    torch.testing.assert_close(out["score"], out["pd"])
    assert "anomaly" in out and "anomaly" in model.components


def test_ipmi2017_ganr_requires_an_anogan_checkpoint(tmp_path):
    cfg = compose_cfg(
        ["+experiment=ipmi2017_ganr", "method.width=4", "data.image_size=16"], tmp_path
    )
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    with pytest.raises(ValueError, match="method.from_checkpoint is required.*ipmi2017_anogan run"):
        model.on_fit_start()
    GANR(latent_dim=8, width=4, image_size=16).on_fit_start()  # the plain method trains its own
