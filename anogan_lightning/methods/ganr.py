"""GANR: AnoGAN's latent mapping with the reference discrimination loss of Yeh et al. (2016), the
"GAN_R" comparison of Schlegl et al., IPMI 2017 (sec. 2.2-2.3, Table 1).

Training: AnoGAN's DCGAN, unchanged (this class subclasses :class:`AnoGAN`). Scoring: Γ steps
of Adam on z with G and D frozen, minimising L(z) = (1 - λ)·Σ|x - G(z)| + λ·L̂_D(z) with
L̂_D(z) = σ(D(G(z)), 1), the sigmoid cross-entropy of the discriminator's verdict on G(z)
against the label "real" (Yeh et al.'s perceptual loss, in place of AnoGAN's feature matching).
Score Â(x) = (1 - λ)·R(x) + λ·D̂(x) at z_Γ (AnoGAN's A(x), sec. 2.3, eq. 6, with D̂ for D);
λ = ``lambda_score`` weights the discrimination term in both L(z) and Â(x). (AnoGAN calls its λ
``lambda_fm``: there it weights feature matching; here there is none.) Components: ``residual`` (R),
``discrimination_ref`` (D̂) and ``pd`` (the discriminator's own verdict on the query, -logit).
The anomaly map is |x - G(z_Γ)|.

``from_checkpoint``: the path of an AnoGAN (or GANR) Lightning checkpoint. Its generator and
discriminator are loaded when fitting starts and training is skipped (the fit stops before its
first batch), so GANR maps and scores with the very networks AnoGAN used, which is how the
paper compares the two. The architecture arguments (latent_dim, channels, width, image_size,
feature_layer) must match the checkpoint's; a mismatch is an error naming them. The file is
read only by ``fit``: ``GANR.load_from_checkpoint(<ganr model.ckpt>)`` does not need it. The
discriminator's batch-norm statistics come with it (recalibrated on training normals when the
AnoGAN run did so; see :mod:`~anogan_lightning.methods.anogan`), so both score with the same D.
``require_checkpoint=true`` (``+experiment=ipmi2017_ganr``) makes a fit without
``from_checkpoint`` an error instead of training a DCGAN of its own.

Every other argument is AnoGAN's, and the configs give them one source: conf/method/base/
dcgan_mapping.yaml, in the defaults lists of both anogan.yaml and ganr.yaml (one mapping:
``mapping_steps``, ``mapping_lr``, ``mapping_restarts``, ``mapping_seed``, and the DCGAN's
training, ``lr``, ``betas``, ``real_label``), so the two differ only in the discrimination
term. Choices the paper leaves open: AnoGAN's.
"""

from __future__ import annotations

import logging

from torch import Tensor

from anogan_lightning.losses import reference_discrimination_loss
from anogan_lightning.methods._checkpoint import load_networks
from anogan_lightning.methods.anogan import AnoGAN
from anogan_lightning.scoring import l1_per_sample, map_latent_reference

log = logging.getLogger(__name__)

ARCH_KEYS = ("latent_dim", "channels", "width", "image_size", "feature_layer")


class GANR(AnoGAN):
    """AnoGAN's DCGAN + latent mapping with the reference discrimination loss; Â, R, D̂, PD."""

    components = ("residual", "discrimination_ref", "pd")
    latent_mapping = staticmethod(map_latent_reference)  # L̂_D in place of feature matching
    discrimination_name = "discrimination_ref"

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 1,
        width: int = 64,
        image_size: int = 64,
        feature_layer: int = -1,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        lambda_score: float = 0.1,
        mapping_steps: int = 500,
        mapping_lr: float = 0.01,
        mapping_seed: int = 0,
        progress: bool = True,
        mapping_restarts: int = 1,
        real_label: float = 1.0,
        calibrate_d: bool = True,
        calibration_batches: int = 50,
        score_name: str = "anomaly",
        from_checkpoint: str | None = None,
        require_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            latent_dim,
            channels,
            width,
            image_size,
            feature_layer,
            lr,
            betas,
            lambda_score,  # the λ of L(z), AnoGAN's lambda_fm argument
            mapping_steps,
            mapping_lr,
            mapping_seed,
            progress,
            mapping_restarts,
            real_label,
            calibrate_d,
            calibration_batches,
            score_name,
        )
        # AnoGAN's save_hyperparameters() recorded both frames: drop λ under AnoGAN's name and
        # record again (hparams_initial, what loggers show, then lacks it too)
        self.hparams.pop("lambda_fm")
        self.save_hyperparameters()

    def load_gan(self, path: str) -> None:
        """Copy ``generator.*`` and ``discriminator.*`` from an AnoGAN-family checkpoint."""
        names = ("generator", "discriminator")
        load_networks(self, path, names, ARCH_KEYS, "method.from_checkpoint")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        path = self.hparams.from_checkpoint
        if not path and self.hparams.require_checkpoint:
            raise ValueError(
                "GANR: method.from_checkpoint is required here (require_checkpoint=true, as in "
                "+experiment=ipmi2017_ganr): the paper compares GAN_R with AnoGAN on the same "
                "trained G and D, so pass method.from_checkpoint=<ipmi2017_anogan run>/"
                "checkpoints/model.ckpt (or method.require_checkpoint=false to train a DCGAN "
                "of its own)"
            )
        if path:
            self.load_gan(path)
            log.info("GANR: generator and discriminator loaded from %s; training skipped", path)

    def on_train_start(self) -> None:
        if self.hparams.from_checkpoint:
            self.trainer.should_stop = True  # the fit loop ends before its first batch

    def mapping_loss(self, x: Tensor, f_x: Tensor, x_hat: Tensor) -> Tensor:
        """GAN_R's L(z) per image (B,): (1 - λ)·Σ|x - G(z)| + λ·L̂_D(z) (``mapping_restarts``
        picks z_1 by it)."""
        d_ref = reference_discrimination_loss(self.discriminator(x_hat).float())
        return (1 - self.lam) * l1_per_sample(x, x_hat) + self.lam * d_ref

    @property
    def lam(self) -> float:
        """λ of L(z) and Â(x): ``lambda_score``, the weight of L̂_D."""
        return self.hparams.lambda_score
