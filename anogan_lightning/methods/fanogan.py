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
can stay unbounded (-1). A time budget is shared between the stages: with ``trainer.max_time``
set, stage 1 ends after ``gan_time_fraction`` of it (or after ``gan_steps``, whichever comes
first) and stage 2 gets the rest (or ``encoder_steps``); the step counts are upper bounds then.
The iteration at which stage 1 ended is the ``gan_iterations`` buffer. A fit in which the encoder
never trained (stage 2 never ran, or ``encoder_steps=0``) has no usable score:
:meth:`FAnoGAN.training_complete` is False (:meth:`FAnoGAN.incomplete_reason` says why), and the
entry point then reports no headline.
With ``trainer.fast_dev_run`` (Lightning's smoke test, one training batch) stage 1 is one
iteration and that batch also runs stage 2's first, so the smoke test covers both stages.
Stage 1 alone: ``encoder_steps=0``. Stage 2 alone: ``gan_checkpoint=<a
FAnoGAN checkpoint>`` loads G and C from it when fitting starts and skips stage 1 (the
architecture arguments must match the checkpoint's). The iteration counter is a buffer, so a
resumed run (``ckpt_path=``) continues in the right stage.

Scoring: A(x) = A_R(x) + κ·A_D(x), the izi_f loss per image, one encoder pass;
components ``residual`` (A_R), ``feature`` (A_D) and ``latent`` = ||E(x) - E(G(E(x)))||², the
latent distance the paper also evaluates (computed as the reference code's
``anomaly_scoring``, summed here, not averaged: the same order). Anomaly map: ``map`` of
:func:`anogan_lightning.scoring.anomaly_map` (the paper's pixel residual |x - G(E(x))|:
``map=residual map_sigma=0``).

Networks (``arch``): ``"resnet"``, the paper's (the reference code's residual WGAN-GP pair,
``nets/wgan.py``, and the encoder on the critic's down-path), or ``"dcgan"``: AnoGAN's DCGAN
generator, a DCGAN critic with layer norm and a DCGAN encoder with batch norm, trained with the
same WGAN-GP and izi_f losses. The paper's networks cost several times more per critic update
on a CPU, so in a CPU budget the generator gets a few hundred updates and emits the same blob for
every input: G(E(x)) reconstructs nothing, and the score measures the distance to that blob
(which on Kermany ranks normals above CNV). The method config uses ``"dcgan"`` for that reason,
the experiment config the paper's ``"resnet"`` (measurements in
experiments/notes/2026-12-02-fanogan-networks-for-a-cpu-budget.md).

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
from pytorch_lightning.callbacks import Timer
from torch import Tensor

from anogan_lightning.losses import (
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from anogan_lightning.methods._checkpoint import load_networks
from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.nets.dcgan import DCGANGenerator
from anogan_lightning.nets.encoder import DCGANEncoder, ResNetEncoder
from anogan_lightning.nets.wgan import DCGANCritic, ResNetCritic, ResNetGenerator
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, izif_scores

log = logging.getLogger(__name__)

ARCH_KEYS = ("latent_dim", "channels", "width", "image_size", "prior", "arch")
# arch -> (generator, critic, encoder) classes, each built as (..., channels, width, image_size)
ARCHS = {
    "resnet": (ResNetGenerator, ResNetCritic, ResNetEncoder),  # the paper's (reference code)
    "dcgan": (DCGANGenerator, DCGANCritic, DCGANEncoder),  # cheaper, for CPU budgets
}


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
        gan_time_fraction: float = 0.5,
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
        arch: str = "resnet",
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r}; expected one of {tuple(ARCHS)}")
        if prior not in ("uniform", "normal"):
            raise ValueError(f"prior must be 'uniform' or 'normal', got {prior!r}")
        if n_critic < 1 or gan_steps < 0 or encoder_steps < 0:
            raise ValueError("n_critic must be >= 1 and gan_steps, encoder_steps >= 0")
        if not 0 < gan_time_fraction < 1:
            raise ValueError(f"gan_time_fraction must be in (0, 1), got {gan_time_fraction}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        generator, critic, encoder = ARCHS[arch]
        self.generator = generator(latent_dim, channels, width, image_size)
        self.critic = critic(channels, width, image_size)
        self.encoder = encoder(latent_dim, channels, width, image_size)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # training batches
        # the iteration at which stage 1 ended (-1: not ended yet, it runs up to gan_steps)
        self.register_buffer("gan_iterations", torch.full((), -1, dtype=torch.long))
        self._stage: int | None = None  # set by the first training batch (also after a resume)

    # -- stages -------------------------------------------------------------------------------
    @property
    def stage_lengths(self) -> tuple[int, int]:
        """(GAN iterations, encoder iterations) of this fit: stage 1 is 0 with a checkpoint, and
        the iteration it ended at once ended (by its steps or by its share of the time budget);
        stage 2 is its upper bound ``encoder_steps``."""
        hp = self.hparams
        ended = int(self.gan_iterations)
        n_gan = ended if ended >= 0 else (0 if hp.gan_checkpoint else hp.gan_steps)
        return n_gan, hp.encoder_steps

    def _gan_time_up(self) -> bool:
        """Stage 1 has used its share ``gan_time_fraction`` of ``trainer.max_time``."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is None:  # no time budget
            return False
        elapsed = timer.time_elapsed()
        return elapsed >= self.hparams.gan_time_fraction * (elapsed + remaining)

    def training_complete(self) -> bool:
        """False when the izi_f encoder never trained (stage 2 never ran, or
        ``encoder_steps=0``): the score would be that of an untrained encoder, so the entry
        point reports no headline (:meth:`incomplete_reason` says why)."""
        return self._incomplete() is None

    def incomplete_reason(self) -> str:
        """Why :meth:`training_complete` is False (empty when it is True)."""
        return self._incomplete() or ""

    def _incomplete(self) -> str | None:
        n_gan, n_enc = self.stage_lengths
        it = int(self.iteration)
        if n_enc == 0:
            return "encoder_steps=0: stage 1 only, the izi_f encoder is untrained"
        if it <= n_gan:
            return (
                f"stage 2 never ran: training stopped at iteration {it} in stage 1 "
                f"({min(it, n_gan)} of {n_gan} GAN iterations), the izi_f encoder is untrained"
            )
        return None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # checkpoints from before the shared time budget: their stage 1 ran gan_steps
        state_dict.setdefault(prefix + "gan_iterations", torch.full((), -1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        log.info(
            "f-AnoGAN: training ended at iteration %d (stage 1: %d GAN iterations of at most "
            "%d, stage 2: %d encoder iterations of at most %d)",
            it,
            min(it, n_gan),
            0 if self.hparams.gan_checkpoint else self.hparams.gan_steps,
            max(it - n_gan, 0),
            n_enc,
        )
        if not self.training_complete():
            log.warning("f-AnoGAN: %s; its scores are not f-AnoGAN's", self.incomplete_reason())

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
        if int(self.gan_iterations) < 0 and (it >= n_gan or self._gan_time_up()):
            self.gan_iterations.fill_(min(it, n_gan))  # stage 1 ends: its steps or its time
            n_gan = int(self.gan_iterations)
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
        if stage == 1 and n_enc > 0 and self.trainer.fast_dev_run:
            # Lightning's smoke test runs one batch: stage 1 ends after this iteration and
            # the same batch runs stage 2's first, so both stages and the test are exercised
            self.gan_iterations.fill_(it + 1)
            n_gan = it + 1
            self._enter_stage(2)
            self._encoder_step(batch["x"])
            self.iteration += 1
        if int(self.iteration) >= n_gan + n_enc:
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
        return self.critic.first_block(x)  # (B, d or 2d, S/2, S/2)

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
