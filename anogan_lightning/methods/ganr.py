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
read only by ``fit``: ``GANR.load_from_checkpoint(<ganr model.ckpt>)`` does not need it.

Choices the paper leaves open: the same as AnoGAN's (z-optimiser Adam lr 0.01, z in [-1, 1],
seeded initial z per image, whole batches mapped at once).
"""

from __future__ import annotations

import logging

from anogan_lightning.methods._checkpoint import load_networks
from anogan_lightning.methods.anogan import AnoGAN
from anogan_lightning.scoring import map_latent_reference

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
        from_checkpoint: str | None = None,
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
        if path:
            self.load_gan(path)
            log.info("GANR: generator and discriminator loaded from %s; training skipped", path)

    def on_train_start(self) -> None:
        if self.hparams.from_checkpoint:
            self.trainer.should_stop = True  # the fit loop ends before its first batch

    @property
    def lam(self) -> float:
        """λ of L(z) and Â(x): ``lambda_score``, the weight of L̂_D."""
        return self.hparams.lambda_score
