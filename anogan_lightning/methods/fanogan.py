"""f-AnoGAN (Schlegl et al., "f-AnoGAN: Fast unsupervised anomaly detection with generative
adversarial networks", Medical Image Analysis 54, 2019).

Two training stages in one fit, counted in iterations (training batches):

1. ``gan_steps`` iterations of WGAN-GP (Gulrajani et al. 2017) on normal images: every
   iteration one critic update on a fresh real batch,
   L_C = E[C(G(z))] - E[C(x)] + λ_gp·E[(||∇C(x̂)||₂ - 1)²] (eq. 3 there, λ_gp = 10), and after
   every ``n_critic``-th (5) critic update one generator update, L_G = -E[C(G(z))]; Adam lr 1e-4,
   betas (0, 0.9); residual generator and layer-normed residual critic (``nets/wgan.py``),
   z 128-dim.
2. ``encoder_steps`` iterations of izi_f encoder training with G and C frozen
   (no gradients, eval mode): L_izi_f = (1/n)·||x - G(E(x))||² + κ·(1/n_d)·||f(x) - f(G(E(x)))||²,
   κ = 1, f = the critic's features before its last (linear) layer, E ending in tanh
   (``nets/encoder.py``).

The fit ends by itself after both stages (``trainer.should_stop``), so ``trainer.max_epochs``
can stay unbounded (-1); ``trainer.max_time`` still caps it, with a warning saying which stage
was cut short. Stage 1 alone: ``encoder_steps=0``. Stage 2 alone: ``gan_checkpoint=<a
FAnoGAN checkpoint>`` loads G and C from it when fitting starts and skips stage 1 (the
architecture arguments must match the checkpoint's). The iteration counter is a buffer, so a
resumed run (``ckpt_path=``) continues in the right stage.

Scoring: A(x) = A_R(x) + κ·A_D(x), the izi_f loss per image, one encoder pass;
components ``residual`` (A_R), ``feature`` (A_D) and ``latent`` = ||E(x) - E(G(E(x)))||², the
latent distance the paper also evaluates (computed as the reference code's
``anomaly_scoring``, summed here, not averaged: the same order). Anomaly map: ``map`` of
:func:`anogan_lightning.scoring.anomaly_map` (the paper's pixel residual |x - G(E(x))|:
``map=residual map_sigma=0``).

Choices the papers leave open:
- Prior z ~ U(-1, 1)^128 (``prior="uniform"``): E ends in tanh, so only a bounded prior can be
  reached in full by the encoder; the reference code defaults to N(0, 1) (``prior="normal"``).
- Encoder optimiser RMSProp, lr 5e-5 (decay 0.9), as in the reference ``z_encoding_izif.py``.
- One critic update per training batch and one generator update after every ``n_critic``-th
  one: the optimisers are built once and each real batch is used once, so the 5:1 schedule
  costs no optimiser rebuilds and no extra data transfer per step.
- The stage is chosen per training batch from the iteration counter, so stage lengths are
  independent of epoch length; at 64 images per batch an epoch of OCT2017's ~50k normal
  B-scans is ~780 iterations.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from anogan_lightning.losses import (
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from anogan_lightning.methods._checkpoint import load_networks
from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.nets.encoder import ResNetEncoder
from anogan_lightning.nets.wgan import ResNetCritic, ResNetGenerator
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, izif_scores

log = logging.getLogger(__name__)

ARCH_KEYS = ("latent_dim", "channels", "width", "image_size", "prior")


class FAnoGAN(AnomalyModule):
    """WGAN-GP + izi_f encoder; scores A = A_R + κ·A_D, and A_R, A_D, the latent distance."""

    components = ("residual", "feature", "latent")

    def __init__(
        self,
        latent_dim: int = 128,
        channels: int = 1,
        width: int = 64,
        image_size: int = 64,
        prior: str = "uniform",
        lambda_gp: float = 10.0,
        n_critic: int = 5,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.0, 0.9),
        encoder_lr: float = 5e-5,
        kappa: float = 1.0,
        gan_steps: int = 100_000,
        encoder_steps: int = 50_000,
        gan_checkpoint: str | None = None,
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
    ) -> None:
        super().__init__()
        if prior not in ("uniform", "normal"):
            raise ValueError(f"prior must be 'uniform' or 'normal', got {prior!r}")
        if n_critic < 1 or gan_steps < 0 or encoder_steps < 0:
            raise ValueError("n_critic must be >= 1 and gan_steps, encoder_steps >= 0")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = ResNetGenerator(latent_dim, channels, width, image_size)
        self.critic = ResNetCritic(channels, width, image_size)
        self.encoder = ResNetEncoder(latent_dim, channels, width, image_size)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # training batches
        self._stage: int | None = None  # set by the first training batch (also after a resume)

    # -- stages -------------------------------------------------------------------------------
    @property
    def stage_lengths(self) -> tuple[int, int]:
        """(GAN iterations, encoder iterations) this fit runs; stage 1 is 0 with a checkpoint."""
        hp = self.hparams
        return (0 if hp.gan_checkpoint else hp.gan_steps), hp.encoder_steps

    def _enter_stage(self, stage: int) -> None:
        """Stage 1: G and C train, E frozen. Stage 2: E trains, G and C frozen in eval mode."""
        self.generator.requires_grad_(stage == 1)
        self.critic.requires_grad_(stage == 1)
        self.encoder.requires_grad_(stage == 2)
        self._stage = stage
        log.info("f-AnoGAN: stage %d from iteration %d", stage, int(self.iteration))

    def sample_z(self, n: int) -> Tensor:
        if self.hparams.prior == "uniform":
            return torch.rand(n, self.hparams.latent_dim, device=self.device) * 2 - 1
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def load_gan(self, path: str) -> None:
        """Copy ``generator.*`` and ``critic.*`` from a FAnoGAN checkpoint."""
        load_networks(self, path, ("generator", "critic"), ARCH_KEYS, "method.gan_checkpoint")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        hp = self.hparams
        if hp.gan_checkpoint:
            self.load_gan(hp.gan_checkpoint)
            log.info(
                "f-AnoGAN: generator and critic loaded from %s; stage 1 skipped", hp.gan_checkpoint
            )
        elif hp.gan_steps == 0 and hp.encoder_steps > 0:
            log.warning(
                "f-AnoGAN: gan_steps=0 and no gan_checkpoint: the encoder learns to invert an untrained generator"
            )

    def on_train_start(self) -> None:
        if int(self.iteration) >= sum(self.stage_lengths):
            self.trainer.should_stop = True  # nothing (left) to train

    def on_train_end(self) -> None:
        super().on_train_end()  # the residual normaliser, on G(E(x))
        n_gan, n_enc = self.stage_lengths
        it = int(self.iteration)
        if it < n_gan + n_enc:
            log.warning(
                "f-AnoGAN: training stopped at iteration %d of %d (stage 1: %d/%d GAN, stage 2: "
                "%d/%d encoder iterations)",
                it,
                n_gan + n_enc,
                min(it, n_gan),
                n_gan,
                max(it - n_gan, 0),
                n_enc,
            )

    # -- training -----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt_e = torch.optim.RMSprop(self.encoder.parameters(), lr=hp.encoder_lr, alpha=0.9)
        return self.adam(self.critic.parameters()), self.adam(self.generator.parameters()), opt_e

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if batch is None:
            return
        n_gan, n_enc = self.stage_lengths
        it = int(self.iteration)
        if it >= n_gan + n_enc:
            self.trainer.should_stop = True
            return
        stage = 1 if it < n_gan else 2
        if stage != self._stage:
            self._enter_stage(stage)
        if stage == 1:
            self._gan_step(batch["x"], it)
        else:
            self._encoder_step(batch["x"])
        self.iteration += 1
        if it + 1 >= n_gan + n_enc:
            self.trainer.should_stop = True

    def _gan_step(self, x: Tensor, it: int) -> None:
        """One critic update; one generator update after every n_critic-th."""
        hp = self.hparams
        opt_c, opt_g, _ = self.optimizers()

        with self.toggled_optimizer(opt_c):
            with torch.no_grad():
                x_fake = self.generator(self.sample_z(len(x)))
            c_real, c_fake = self.critic(x), self.critic(x_fake)
            gp = gradient_penalty(self.critic, x, x_fake)
            loss_c = wasserstein_critic_loss(c_real, c_fake) + hp.lambda_gp * gp
            self.optimizer_update(opt_c, loss_c, "train/loss_d")
        logs = {
            "train/loss_d": loss_c.detach(),
            "train/wasserstein": (c_real.mean() - c_fake.mean()).detach(),
            "train/gp": gp.detach(),
        }

        if (it + 1) % hp.n_critic == 0:
            with self.toggled_optimizer(opt_g):
                x_fake = self.generator(self.sample_z(len(x)))
                loss_g = wasserstein_generator_loss(self.critic(x_fake))
                self.optimizer_update(opt_g, loss_g, "train/loss_g")
            logs["train/loss_g"] = loss_g.detach()
        self.log_dict(logs, prog_bar=True)

    def _encoder_step(self, x: Tensor) -> None:
        """One izi_f update of E; G and C frozen in eval mode (batch-norm statistics fixed)."""
        _, _, opt_e = self.optimizers()
        self.generator.eval()
        self.critic.eval()
        with self.toggled_optimizer(opt_e):
            x_hat = self.generator(self.encoder(x))
            with torch.no_grad():
                f_x = self.critic.features(x)
            loss, residual, feature = izif_scores(
                x, x_hat, f_x, self.critic.features(x_hat), self.hparams.kappa
            )
            loss_e = loss.mean()
            self.optimizer_update(opt_e, loss_e, "train/loss_e")
        self.log_dict(
            {
                "train/loss_e": loss_e.detach(),
                "train/loss_e_residual": residual.mean().detach(),
                "train/loss_e_feature": feature.mean().detach(),
            },
            prog_bar=True,
        )

    # -- scoring ------------------------------------------------------------------------------
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.generator(self.encoder(x)).float()

    def map_features(self, x: Tensor) -> Tensor:
        body = self.critic.body
        return body.blocks[0](body.stem(x))  # the critic's first block, (B, 2d, S/2, S/2)

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        x = batch["x"]
        with torch.no_grad():
            z = self.encoder(x)  # (B, latent_dim); one pass, no latent search
            x_hat = self.generator(z)
            score, residual, feature = izif_scores(
                x, x_hat, self.critic.features(x), self.critic.features(x_hat), self.hparams.kappa
            )
            latent = (z.float() - self.encoder(x_hat).float()).pow(2).sum(1)
        return {
            "score": score,
            "residual": residual,
            "feature": feature,
            "latent": latent,
            "x_hat": x_hat.float(),
            "amap": self.anomaly_map(x, x_hat),
            "z": z.float(),
        }
