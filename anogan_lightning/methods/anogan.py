"""AnoGAN (Schlegl et al., "Unsupervised Anomaly Detection with Generative Adversarial Networks to
Guide Marker Discovery", IPMI 2017).

Training: a DCGAN on normal images only (non-saturating GAN loss, Adam). Scoring (sec. 2.2-2.3):
Γ steps of back-propagation on z with G and D frozen, minimising
L(z) = (1 - λ)·L_R(z) + λ·L_D(z), L_R = Σ|x - G(z)|, L_D = Σ|f(x) - f(G(z))|; the anomaly score
A(x) = (1 - λ)·R(x) + λ·D(x) with R, D the two terms at z_Γ. Components reported beside A:
``residual`` (R), ``discrimination`` (D) and ``pd``, the trained discriminator's own verdict on
the query (the paper's fourth comparison; -logit, so higher = less real). The pixel anomaly
map is the residual |x - G(z_Γ)|.

Choices the paper leaves open:
- z-optimiser: Adam, lr 0.01 (``mapping_lr``), z initialised from the prior with a generator
  seeded by the image's id (reproducible, and the same whatever batch or DDP rank the image
  lands in) and clamped to the prior's support [-1, 1] after each step.
- z_1: the paper draws one z_1 at random. ``mapping_restarts`` K > 1 draws K and starts from
  the one with the lowest L(z) (K forward passes, no gradients): a cheap guard against
  starting in the wrong basin (a retina mapped to the wrong height, say). Default 1 (paper).
- f: the discriminator's last hidden block (``feature_layer=-1``), before the logit layer.
- GAN training: DCGAN's Adam (lr 2e-4, betas (0.5, 0.999)), one D and one G update per batch.
  ``real_label`` < 1 is one-sided label smoothing of D's real targets (Salimans et al. 2016);
  the CPU demo config uses 0.9, which keeps D from saturating early on small data.
- The whole batch is mapped at once (see ``scoring.map_latent``); the paper maps one image
  at a time, which leaves most of a GPU idle.

Discriminator statistics at scoring time (``calibrate_d``, default on): every training step
runs D once on real images and twice on generated ones, so the batch-norm running statistics
that eval mode uses for f(x), D(x) and P_D would be about two-thirds those of fakes, and f(x)
would not describe the query by the statistics of normal images as the paper's feature matching
means. After training, D's batch-norm statistics are recalibrated on real training normals
(:class:`~anogan_lightning.methods.bn_calibration.DiscriminatorCalibration`: reset, then a cumulative average over up to
``calibration_batches`` batches of the training loader with D in train mode and no gradients;
weights untouched). Chosen over a normalisation without running statistics (layer or instance
norm in D) because it leaves the paper's DCGAN and its training exactly as they are, and because
it applies to checkpoints trained before it (``fit=false`` recalibrates a checkpoint whose D
was not). ``discriminator.calibrated`` records it in the checkpoint, so it is done once: a
``fit=false`` run on a recalibrated checkpoint does not redo it. ``calibrate_d=false`` is the
paper-literal reading (statistics as training left them); it cannot undo a recalibration that a
checkpoint already holds.

``score_name`` picks the headline ``score`` (and so ``test/auroc`` and the validation
threshold): ``anomaly`` (A(x), default) or a component, e.g. ``pd`` for the P_D row; A(x) is then
reported as the component ``anomaly``.
"""

from __future__ import annotations

import logging
import zlib

import torch
from torch import Tensor

from anogan_lightning.losses import bce_generator_loss
from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.methods.bn_calibration import DiscriminatorCalibration
from anogan_lightning.nets.dcgan import (
    DCGANDiscriminator,
    DCGANGenerator,
    sample_uniform_z,
)
from anogan_lightning.scoring import frozen, l1_per_sample, map_latent, residual_map

log = logging.getLogger(__name__)


def headline(out: dict[str, Tensor], score_name: str) -> dict[str, Tensor]:
    """``out`` with ``score_name``'s values as ``score``; A(x) kept as ``anomaly``."""
    if score_name == "anomaly":
        return out
    return {**out, "anomaly": out["score"], "score": out[score_name]}


class AnoGAN(DiscriminatorCalibration, AnomalyModule):
    """DCGAN + iterative latent mapping; scores A, R, D and PD."""

    needs_grad_at_test = True
    components = ("residual", "discrimination", "pd")
    #: the latent mapping ``score`` runs, and the component name of its discrimination term
    latent_mapping = staticmethod(map_latent)
    discrimination_name = "discrimination"

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 1,
        width: int = 64,
        image_size: int = 64,
        feature_layer: int = -1,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        lambda_fm: float = 0.1,
        mapping_steps: int = 500,
        mapping_lr: float = 0.01,
        mapping_seed: int = 0,
        progress: bool = True,
        mapping_restarts: int = 1,
        real_label: float = 1.0,
        calibrate_d: bool = True,
        calibration_batches: int = 50,
        score_name: str = "anomaly",
    ) -> None:
        super().__init__()
        if score_name != "anomaly":
            if score_name not in type(self).components:
                choices = ", ".join(("anomaly", *type(self).components))
                raise ValueError(f"score_name must be one of {choices}, got {score_name!r}")
            self.components = ("anomaly", *type(self).components)  # A(x) beside the headline
        self.check_calibration_batches(calibration_batches)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = DCGANGenerator(latent_dim, channels, width, image_size)
        self.discriminator = DCGANDiscriminator(channels, width, image_size, feature_layer)

    def configure_optimizers(self):
        return self.adam(self.discriminator.parameters()), self.adam(self.generator.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if batch is None:
            return
        x = batch["x"]
        opt_d, opt_g = self.optimizers()
        z = sample_uniform_z(len(x), self.hparams.latent_dim, device=x.device)

        x_fake = self.generator(z)  # before toggling: the G step back-propagates through it

        # D step: maximise log D(x) + log(1 - D(G(z)))
        real_label = self.hparams.real_label
        logs = self.bce_discriminator_update(self.discriminator, opt_d, x, x_fake, real_label)

        # G step: non-saturating, maximise log D(G(z))
        with self.toggled_optimizer(opt_g):
            loss_g = bce_generator_loss(self.discriminator(x_fake))
            self.optimizer_update(opt_g, loss_g, "train/loss_g")

        self.log_dict({**logs, "train/loss_g": loss_g.detach()}, prog_bar=True)

    def prior_draws(self, ids: list[str], k: int = 1) -> Tensor:
        """(k, B, latent_dim) prior draws, each image's from a generator seeded by
        (mapping_seed, its id): an image maps the same whatever batch, order or rank it is in."""
        d = self.hparams.latent_dim
        draws = []
        for id_ in ids:
            seed = (self.hparams.mapping_seed * 1_000_003 + zlib.crc32(str(id_).encode())) % 2**63
            draws.append(sample_uniform_z(k, d, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(draws, 1).to(self.device)

    def start_z(self, x: Tensor, ids: list[str]) -> Tensor:
        """z_1 per image: its first prior draw, or with ``mapping_restarts`` K > 1 the one of
        its K draws with the lowest mapping loss L(z) (:meth:`mapping_loss`) (forward passes only; the Γ steps then
        start from it)."""
        k = max(1, self.hparams.mapping_restarts)
        cands = self.prior_draws(ids, k)  # (K, B, latent_dim)
        if k == 1:
            return cands[0]
        g, d = self.generator, self.discriminator
        with frozen(g, d), torch.no_grad():
            f_x = d.forward_with_features(x)[1].float()
            # one batch of G at a time: memory as for the mapping itself
            losses = [self.mapping_loss(x, f_x, g(z).float()) for z in cands]
        best = torch.stack(losses).argmin(0)  # (B,)
        return cands[best, torch.arange(len(x), device=best.device)]

    def mapping_loss(self, x: Tensor, f_x: Tensor, x_hat: Tensor) -> Tensor:
        """L(z) per image (B,) at x_hat = G(z), f_x = f(x): (1 - λ)·Σ|x - G(z)| + λ·Σ|f(x) - f(G(z))|."""
        f_hat = self.discriminator.forward_with_features(x_hat)[1].float()
        return (1 - self.lam) * l1_per_sample(x, x_hat) + self.lam * l1_per_sample(f_x, f_hat)

    @property
    def lam(self) -> float:
        """λ of the mapping loss L(z) and the score A(x) (eq. 5-6): ``lambda_fm``, the weight of
        the feature-matching term."""
        return self.hparams.lambda_fm

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        x = batch["x"]
        hp = self.hparams
        m = self.latent_mapping(
            self.generator,
            self.discriminator,
            x,
            self.start_z(x.float(), batch["id"]),
            steps=hp.mapping_steps,
            lam=self.lam,
            lr=hp.mapping_lr,
            progress=hp.progress,
        )
        with torch.no_grad():
            pd = -self.discriminator(x).float()  # higher = judged less real
        out = {
            "score": m.score,
            "residual": m.residual,
            self.discrimination_name: m.discrimination,
            "pd": pd,
            "x_hat": m.x_hat,
            "amap": residual_map(x.float(), m.x_hat),
            "z": m.z,
        }
        return headline(out, hp.get("score_name", "anomaly"))
