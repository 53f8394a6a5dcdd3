"""AnoGAN specifics: best-of-K start, PD sign, the mapping inside the module, D's batch-norm
statistics recalibrated on real images, the headline score."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

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


# -- discriminator statistics from real images --------------------------------------------------
def _batch_stats(d, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """By hand: (mean, unbiased var) per channel of the input of each of D's batch norms, D in
    train mode (each batch norm normalises by its batch's own statistics)."""
    import torch.nn.functional as F
    from torch import nn

    stats, h = [], x
    with torch.no_grad():
        for block in d.blocks:
            for layer in block:
                if isinstance(layer, nn.BatchNorm2d):
                    stats.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
                    h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                else:
                    h = layer(h)
    return stats


def test_recalibration_gives_the_statistics_of_the_real_batches():
    from anogan_lightning.nets.dcgan import DCGANDiscriminator, recalibrate_batch_norm

    torch.manual_seed(0)
    d = DCGANDiscriminator(1, 4, 16).eval()
    a, b = torch.rand(8, 1, 16, 16) * 2 - 1, torch.rand(8, 1, 16, 16)
    weights = {k: v.clone() for k, v in d.named_parameters()}
    assert recalibrate_batch_norm(d, [a]) == 1
    norms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1  # 16x16: two blocks, batch norm in the second only
    for bn, (mean, var) in zip(norms, _batch_stats(d, a), strict=True):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.momentum == 0.1  # restored
    assert not d.training  # mode restored
    for k, v in d.named_parameters():
        assert torch.equal(v, weights[k]), k
    # several batches: the cumulative average of their statistics, whatever came before
    recalibrate_batch_norm(d, [b, a])
    for bn, sa, sb in zip(norms, _batch_stats(d, a), _batch_stats(d, b), strict=True):
        torch.testing.assert_close(bn.running_mean, (sa[0] + sb[0]) / 2)
        torch.testing.assert_close(bn.running_var, (sa[1] + sb[1]) / 2)
    before = norms[0].running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batch_norm(d, [])
    assert torch.equal(norms[0].running_mean, before)


def _fit(model, batches: list[dict], steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer


def test_training_ends_with_d_recalibrated_on_real_images_generator_untouched(tmp_path):
    pl.seed_everything(0)
    batch = next(iter(DataLoader(make_split(16, 16, "train", seed=2), batch_size=16)))
    kw = dict(latent_dim=8, width=4, image_size=16, progress=False, calibration_batches=1)
    model = AnoGAN(**kw, calibrate_d=False)
    _fit(model, [batch] * 3, 6)
    bn = model.discriminator.blocks[1][1]
    assert not bool(model.discriminator.calibrated)
    ((mean, var),) = _batch_stats(model.discriminator, batch["x"])
    assert not torch.allclose(bn.running_mean, mean, atol=1e-3)  # trained on 2/3 fakes
    g_state = {k: v.clone() for k, v in model.generator.state_dict().items()}
    model.calibrate_discriminator([batch, None, batch])  # up to calibration_batches = 1
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bool(model.discriminator.calibrated)
    for k, v in model.generator.state_dict().items():
        assert torch.equal(v, g_state[k]), k

    # the default: done by the fit itself, and the flag and statistics live in the checkpoint
    pl.seed_everything(0)
    model = AnoGAN(**kw)
    trainer = _fit(model, [batch] * 3, 6)
    ((mean, var),) = _batch_stats(model.discriminator, batch["x"])
    bn = model.discriminator.blocks[1][1]
    torch.testing.assert_close(bn.running_mean, mean)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = AnoGAN.load_from_checkpoint(tmp_path / "m.ckpt")
    assert bool(loaded.discriminator.calibrated)
    torch.testing.assert_close(loaded.discriminator.blocks[1][1].running_var, var)


@pytest.mark.slow
def test_fit_false_recalibrates_only_a_checkpoint_that_was_not(tmp_path, monkeypatch):
    """Through the entry point: a fit recalibrates once; fit=false on its model.ckpt does not
    redo it; fit=false on a checkpoint from before the flag recalibrates (from the run's data
    config), unless calibrate_d=false."""
    from conftest import compose_cfg, tiny_overrides

    from anogan_lightning.methods import bn_calibration as anogan_module
    from anogan_lightning.train import run

    calls = []
    real = anogan_module.recalibrate_batch_norm

    def counting(module, batches):
        calls.append(module)
        return real(module, batches)

    monkeypatch.setattr(anogan_module, "recalibrate_batch_norm", counting)
    base = tiny_overrides("anogan")
    fitted = run(compose_cfg(base, tmp_path / "fit"))
    assert len(calls) == 1
    ckpt = tmp_path / "fit/checkpoints/model.ckpt"
    rescored = run(compose_cfg(base + ["fit=false", f"ckpt_path={ckpt}"], tmp_path / "again"))
    assert len(calls) == 1  # the checkpoint's D was recalibrated: not again
    assert rescored["test/auroc"] == fitted["test/auroc"]

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state["state_dict"]["discriminator.calibrated"]  # a checkpoint from before the flag
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    off = ["fit=false", f"ckpt_path={old}", "method.calibrate_d=false"]
    run(compose_cfg(base + off, tmp_path / "off"))
    assert len(calls) == 1
    run(compose_cfg(base + ["fit=false", f"ckpt_path={old}"], tmp_path / "old"))
    assert len(calls) == 2


# -- the headline score ---------------------------------------------------------------------------
def test_score_name_picks_the_headline_and_keeps_a():
    torch.manual_seed(0)
    ds = make_split(4, 16, "test")
    batch = {"x": ds.images, "id": ds.ids}
    kw = dict(latent_dim=8, width=4, image_size=16, mapping_steps=2, progress=False)
    model, pd = AnoGAN(**kw), AnoGAN(**kw, score_name="pd")
    pd.load_state_dict(model.state_dict())
    out_a, out_pd = model.eval().score(batch), pd.eval().score(batch)
    assert pd.components == ("anomaly", "residual", "discrimination", "pd")
    torch.testing.assert_close(out_pd["score"], out_pd["pd"])
    torch.testing.assert_close(out_pd["anomaly"], out_a["score"])
    torch.testing.assert_close(
        out_a["score"], 0.9 * out_a["residual"] + 0.1 * out_a["discrimination"]
    )
    assert "anomaly" not in out_a and model.components == AnoGAN.components
    with pytest.raises(ValueError, match="score_name must be one of anomaly, residual"):
        AnoGAN(**kw, score_name="latent")
