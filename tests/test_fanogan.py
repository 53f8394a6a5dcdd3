"""f-AnoGAN: gradient penalty, nets, the 5:1 WGAN-GP stage, izi_f with frozen G and critic, and
the two stages through the entry point (together, and stage 2 alone from a stage-1 checkpoint)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import check_results_against_scores, compose_cfg, tiny_overrides
from pytorch_lightning.callbacks import Timer
from torch import nn
from torch.utils.data import DataLoader

from anogan_lightning.data.synthetic import make_split
from anogan_lightning.losses import (
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from anogan_lightning.methods.fanogan import ARCHS, FAnoGAN
from anogan_lightning.nets.encoder import ResNetEncoder
from anogan_lightning.nets.wgan import ResNetCritic, ResNetGenerator
from anogan_lightning.scoring import izif_scores
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(latent_dim=8, width=4, image_size=16)


def _trainer(steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def _fixed_batches(n: int, size: int = 16) -> DataLoader:
    batch = next(iter(DataLoader(make_split(16, size, "train", seed=2), batch_size=16)))
    return DataLoader([batch] * n, batch_size=None)


# -- losses ---------------------------------------------------------------------------------------
class _Linear(nn.Module):
    """C(x) = <w, x>: ∇_x C = w for every x, so the penalty is (||w|| - 1)²."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


class _HalfSquare(nn.Module):
    """C(x) = ||x||² / 2: ∇_x C = x, so the penalty is (||x̂|| - 1)² at x̂ = αx + (1 - α)x̃."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.pow(2).flatten(1).sum(1)


def test_gradient_penalty_linear_critic_and_its_parameter_gradient():
    w = torch.tensor([[[[2.0, 1.0], [2.0, 0.0]]]])  # ||w|| = 3
    critic = _Linear(w.clone())
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((3 - 1) ** 2, rel=1e-6)
    gp.backward()  # d/dw (||w|| - 1)² = 2 (||w|| - 1) w / ||w|| = 4/3 w
    torch.testing.assert_close(critic.w.grad, 4 / 3 * w)


def test_gradient_penalty_interpolates_per_sample():
    real = torch.ones(2, 1, 2, 2)  # ||1|| = 2 over 4 pixels
    fake = torch.zeros(2, 1, 2, 2)
    alpha = torch.tensor([0.5, 1.0])  # x̂ norms: 1 and 2 -> penalties 0 and 1
    gp = gradient_penalty(_HalfSquare(), real, fake, alpha=alpha)
    assert gp.item() == pytest.approx(0.5, abs=1e-6)
    # α weights the real image: α = 0 puts x̂ on the fake, whose norm is 0 -> (0 - 1)² = 1
    gp0 = gradient_penalty(_HalfSquare(), real, fake, alpha=torch.zeros(2))
    assert gp0.item() == pytest.approx(1.0, abs=1e-5)


def test_wasserstein_losses():
    real, fake = torch.tensor([3.0, 1.0]), torch.tensor([0.5, -0.5])
    assert wasserstein_critic_loss(real, fake).item() == pytest.approx(0.0 - 2.0)
    assert wasserstein_generator_loss(fake).item() == pytest.approx(0.0)


def test_izif_scores_hand_computed():
    x, x_hat = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    x_hat[1] = 3.0  # residuals 1 and 9 per pixel
    f_x, f_hat = torch.zeros(2, 5), torch.full((2, 5), 2.0)  # feature term 4
    score, residual, feature = izif_scores(x, x_hat, f_x, f_hat, kappa=0.5)
    torch.testing.assert_close(residual, torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(feature, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(score, torch.tensor([3.0, 11.0]))


# -- networks -------------------------------------------------------------------------------------
def test_paper_size_layout():
    """64x64, d = 64: generator blocks 8d-8d-4d-2d-d, critic d-2d-4d-8d-8d with layer norm only,
    f(x) = 8d·4·4 features; the encoder's down-path is the critic's with batch norm."""
    g, c, e = (
        ResNetGenerator(128, 1, 64, 64),
        ResNetCritic(1, 64, 64),
        ResNetEncoder(128, 1, 64, 64),
    )
    assert [b.conv2.out_channels for b in g.blocks] == [512, 256, 128, 64]
    assert g.project.in_features == 128
    assert [b.conv2.out_channels for b in c.body.blocks] == [128, 256, 512, 512]
    assert c.body.out_features == 512 * 16 == c.head.in_features
    assert not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in c.modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in e.modules()) == 8


def test_dcgan_layout_has_no_batch_norm_in_the_critic():
    """arch="dcgan" at 64x64, d = 16: AnoGAN's generator, critic d-2d-4d-8d with layer norm
    (never batch norm: the penalty is per sample), f(x) = 8d·4·4; encoder with batch norm."""
    g, c, e = (cls(*args) for cls, args in zip(ARCHS["dcgan"], _args(128, 16, 64), strict=True))
    assert g.project.in_features == 128
    assert [b[0].out_channels for b in c.blocks] == [16, 32, 64, 128]
    assert c.out_features == 128 * 16 == c.head.in_features and c.head.bias is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in c.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in e.modules()) == 3
    assert c.first_block(torch.zeros(2, 1, 64, 64)).shape == (2, 16, 32, 32)


def _args(latent: int, width: int, size: int) -> tuple[tuple, tuple, tuple]:
    """Constructor arguments of (generator, critic, encoder) in ``ARCHS``."""
    return (latent, 1, width, size), (1, width, size), (latent, 1, width, size)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shapes_ranges_and_per_sample_critic(arch):
    g, c, e = (cls(*a) for cls, a in zip(ARCHS[arch], _args(8, 4, 32), strict=True))
    z = torch.rand(3, 8) * 2 - 1
    x = g(z)
    assert x.shape == (3, 1, 32, 32) and x.abs().max() <= 1
    value, f = c.forward_with_features(x)
    assert value.shape == (3,) and f.shape == (3, c.head.in_features)  # 4x4 positions
    assert f.shape[1] == (8 * 4 * 16 if arch == "resnet" else 4 * 4 * 16)  # 8d or 4d channels
    code = e(x)
    assert code.shape == (3, 8) and code.abs().max() < 1
    # layer norm keeps samples independent (the gradient penalty is per sample)
    other = x.clone()
    other[1:] = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(c(other)[0], value[0])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_parameter_gets_a_gradient(arch):
    g, c, e = (cls(*a) for cls, a in zip(ARCHS[arch], _args(8, 4, 16), strict=True))
    value, f = c.forward_with_features(g(e(torch.randn(4, 1, 16, 16))))
    (value.sum() + f.sum()).backward()
    for name, p in [*g.named_parameters(), *c.named_parameters(), *e.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- the two training stages ----------------------------------------------------------------------
class _Record(pl.Callback):
    def __init__(self, model: FAnoGAN) -> None:
        self.touched: set[str] = set()
        self.losses: list[float] = []
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: self.touched.add(name) if p.grad.abs().sum() > 0 else None
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizers = [id(o) for o in trainer.optimizers]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        key = "train/loss_d" if pl_module._stage == 1 else "train/loss_e"
        self.losses.append(float(trainer.callback_metrics[key]))
        assert [id(o) for o in trainer.optimizers] == self.optimizers  # never rebuilt


def test_wgan_gp_stage_schedule_gradients_and_critic_loss():
    """Stage 1 alone: n_critic critic updates per generator update with the same optimizers;
    every G and critic parameter learns, the encoder does not; the critic loss on one fixed
    batch goes down."""
    pl.seed_everything(0)
    model = FAnoGAN(**TINY, n_critic=3, gan_steps=15, encoder_steps=0)
    rec = _Record(model)
    _trainer(100, [rec]).fit(model, _fixed_batches(40))
    assert int(model.iteration) == 15 and len(rec.losses) == 15  # the fit stopped by itself
    opt_c, opt_g, opt_e = model.trainer.optimizers
    first = lambda opt: opt.state[opt.param_groups[0]["params"][0]]  # noqa: E731
    assert int(first(opt_c)["step"]) == 15 and int(first(opt_g)["step"]) == 15 // 3
    assert not opt_e.state
    gc = {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    assert gc <= rec.touched and not any(n.startswith("encoder.") for n in rec.touched)
    assert sum(rec.losses[-3:]) < sum(rec.losses[:3]), rec.losses


def test_izif_lowers_encoder_loss_with_generator_and_critic_bit_identical():
    pl.seed_everything(0)
    model = FAnoGAN(**TINY, gan_steps=0, encoder_steps=25, encoder_lr=1e-3, map="residual")
    gc = ("generator.", "critic.")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(gc)}
    loader = _fixed_batches(30)
    batch = next(iter(loader))

    def izi_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.score(batch)["score"].mean())

    before = izi_loss()
    rec = _Record(model)
    _trainer(100, [rec]).fit(model, loader)
    after = izi_loss()
    assert int(model.iteration) == 25
    assert after < 0.98 * before, (before, after)
    assert rec.losses[-1] < rec.losses[0]
    state = model.state_dict()
    for k, v in frozen.items():  # weights and batch-norm statistics
        assert torch.equal(state[k], v), k
    assert {n.split(".")[0] for n in rec.touched} == {"encoder"}


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_both_stages_in_one_command(tmp_path: Path):
    stages = ["method.gan_steps=4", "method.encoder_steps=3", "method.n_critic=2"]
    res = run(compose_cfg(tiny_overrides("fanogan") + stages + ["trainer.max_epochs=-1"], tmp_path))
    check_results_against_scores(tmp_path, res)
    assert {"test/auroc_residual", "test/auroc_feature", "test/auroc_latent"} <= set(res)
    ckpt = _ckpt(tmp_path / "checkpoints/model.ckpt")
    assert int(ckpt["state_dict"]["iteration"]) == 7  # the fit ended after both stages
    assert ckpt["global_step"] == 4 + 4 // 2 + 3  # critic + generator + encoder updates


def test_stage2_alone_from_a_stage1_checkpoint(tmp_path: Path):
    pl.seed_everything(0)
    stage1 = FAnoGAN(**TINY, n_critic=2, gan_steps=4, encoder_steps=0)
    trainer = _trainer(100)
    trainer.fit(stage1, _fixed_batches(8))
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)

    stage2 = FAnoGAN(**TINY, gan_steps=1000, encoder_steps=3, gan_checkpoint=str(path))
    encoder_before = {k: v.clone() for k, v in stage2.encoder.state_dict().items()}
    rec = _Record(stage2)
    _trainer(100, [rec]).fit(stage2, _fixed_batches(8))
    assert int(stage2.iteration) == 3 and len(rec.losses) == 3  # gan_steps ignored: loaded
    assert {n.split(".")[0] for n in rec.touched} == {"encoder"}
    for name in ("generator", "critic"):
        theirs = getattr(stage1, name).state_dict()
        for k, v in getattr(stage2, name).state_dict().items():
            assert torch.equal(v, theirs[k]), f"{name}.{k}"
    assert not torch.equal(stage2.encoder.head.weight, encoder_before["head.weight"])

    wrong = FAnoGAN(latent_dim=8, width=8, image_size=16)  # stage 1 used width 4
    with pytest.raises(ValueError, match="width: checkpoint 4 vs config 8"):
        wrong.load_gan(str(path))


# -- the shared time budget ------------------------------------------------------------------------
class _FakeTimer(Timer):
    """A Timer whose clock advances 10 s per training batch: a 100 s budget is 10 batches."""

    def __init__(self) -> None:
        super().__init__(duration=timedelta(seconds=100), interval="step")
        self.batches = 0

    def time_elapsed(self, stage: str = "train") -> float:
        return 10.0 * self.batches

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        self.batches += 1
        super().on_train_batch_end(trainer, *args, **kwargs)


def test_time_budget_is_shared_between_the_stages(tmp_path: Path):
    """Stage 1 stops at its share of max_time, not at its (far larger) gan_steps; stage 2 gets
    the rest; the switch point survives a checkpoint."""
    pl.seed_everything(0)
    model = FAnoGAN(**TINY, gan_steps=1000, encoder_steps=1000, gan_time_fraction=0.3)
    rec = _Record(model)
    trainer = _trainer(1000, [rec, _FakeTimer()])
    trainer.fit(model, _fixed_batches(40))
    # elapsed 0, 10, 20 s: stage 1; at 30 s (= 0.3 * 100 s) stage 2 starts; 100 s ends the fit
    assert int(model.gan_iterations) == 3 and int(model.iteration) == 10
    assert model.stage_lengths == (3, 1000)
    assert model.training_complete() and model.incomplete_reason() == ""
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = FAnoGAN.load_from_checkpoint(tmp_path / "m.ckpt")
    assert int(again.gan_iterations) == 3 and again.training_complete()


def test_no_stage2_means_training_incomplete():
    pl.seed_everything(0)
    cut = FAnoGAN(**TINY, gan_steps=10, encoder_steps=5)
    _trainer(1000, max_epochs=1).fit(cut, _fixed_batches(4))  # 4 batches: stage 1 cut short
    assert int(cut.iteration) == 4
    assert not cut.training_complete() and "stage 2 never ran" in cut.incomplete_reason()
    stage1_only = FAnoGAN(**TINY, gan_steps=2, encoder_steps=0)
    _trainer(1000).fit(stage1_only, _fixed_batches(4))
    assert not stage1_only.training_complete()
    assert "encoder_steps=0" in stage1_only.incomplete_reason()
    done = FAnoGAN(**TINY, gan_steps=2, encoder_steps=1)
    _trainer(1000).fit(done, _fixed_batches(4))
    assert int(done.iteration) == 3 and done.training_complete()


def test_checkpoint_from_before_the_time_budget_loads():
    model = FAnoGAN(**TINY, gan_steps=4, encoder_steps=2)
    state = {k: v for k, v in model.state_dict().items() if k != "gan_iterations"}
    state["iteration"] = torch.tensor(6)
    model.load_state_dict(state)  # strict, as fit=false loads
    assert int(model.gan_iterations) == -1 and model.stage_lengths == (4, 2)
    assert model.training_complete()
