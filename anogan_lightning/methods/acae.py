"""aCAE: adversarial convolutional autoencoder, the autoencoder baseline of Schlegl et al.,
IPMI 2017 (sec. 3, Table 1).

Networks (``nets/acae.py``): an encoder with the DCGAN discriminator's layout to a
``latent_dim`` code, AnoGAN's DCGAN generator as the decoder, and a DCGAN discriminator as the
adversary, so every network has the depth of AnoGAN's. Training on normal images, per batch
(manual optimisation, one update each):

- D: -log D(x) - log(1 - D(x̂)), x̂ = Dec(Enc(x)) (reconstructions play the fakes);
- autoencoder: L = λ_rec·(1/n)Σ|x - x̂| + λ_adv·(-log D(x̂)).

Scoring: AnoGAN's A(x) = (1 - λ)·R(x) + λ·D(x) (sec. 2.3, eq. 6; λ = ``lambda_score``, the
weight of D in the score, not of a training loss) on the autoencoder's own reconstruction, with
R = Σ|x - x̂| and D = Σ|f(x) - f(x̂)|, f = the discriminator's block ``feature_layer``; no
latent search, one forward pass (``scoring.reconstruction_scores``). Components: ``residual``,
``discrimination`` and ``pd`` (the discriminator's verdict on the query, -logit). Anomaly map:
``map`` of :func:`anogan_lightning.scoring.anomaly_map` (the paper's |x - x̂|:
``map=residual map_sigma=0``).

Choices the paper leaves open:
- Reconstruction loss L1 (mean), the distance the residual score R uses.
- λ_rec = 50, λ_adv = 1: the weighting GANomaly (Akcay et al. 2018) uses for the same two
  terms; reconstruction dominates, the adversarial term sharpens x̂.
- Adam lr 2e-4, betas (0.5, 0.999) for both (DCGAN's, as for AnoGAN).
- The discriminator sees one real batch and two of reconstructions per step, so its batch-norm
  statistics are recalibrated on real training normals after training, as AnoGAN's
  (``calibrate_d``, ``calibration_batches``: :class:`~anogan_lightning.methods.anogan.
  DiscriminatorCalibration`); ``calibrate_d=false`` keeps the statistics training left.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anogan_lightning.losses import bce_generator_loss
from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.methods.bn_calibration import DiscriminatorCalibration
from anogan_lightning.nets.acae import ConvAutoencoder
from anogan_lightning.nets.dcgan import DCGANDiscriminator
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, reconstruction_scores


class ACAE(DiscriminatorCalibration, AnomalyModule):
    """Adversarial convolutional autoencoder; scores A, R, D and PD on its reconstruction."""

    components = ("residual", "discrimination", "pd")

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 1,
        width: int = 64,
        image_size: int = 64,
        feature_layer: int = -1,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        lambda_rec: float = 50.0,
        lambda_adv: float = 1.0,
        lambda_score: float = 0.1,
        calibrate_d: bool = True,
        calibration_batches: int = 50,
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
    ) -> None:
        super().__init__()
        self.check_calibration_batches(calibration_batches)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.autoencoder = ConvAutoencoder(latent_dim, channels, width, image_size)
        self.discriminator = DCGANDiscriminator(channels, width, image_size, feature_layer)

    def configure_optimizers(self):
        return self.adam(self.discriminator.parameters()), self.adam(self.autoencoder.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if batch is None:
            return
        x = batch["x"]
        hp = self.hparams
        opt_d, opt_ae = self.optimizers()
        x_hat = self.autoencoder(x)  # before toggling: the AE step back-propagates through it

        # D step: real queries vs their reconstructions
        logs = self.bce_discriminator_update(self.discriminator, opt_d, x, x_hat)

        # autoencoder step: λ_rec·mean|x - x̂| + λ_adv·(-log D(x̂))
        with self.toggled_optimizer(opt_ae):
            loss_rec = (x - x_hat).abs().mean()
            loss_adv = bce_generator_loss(self.discriminator(x_hat))
            loss_ae = hp.lambda_rec * loss_rec + hp.lambda_adv * loss_adv
            self.check_finite(**{"train/loss_rec": loss_rec, "train/loss_adv": loss_adv})
            self.optimizer_update(opt_ae, loss_ae)

        logs |= {"train/loss_ae": loss_ae, "train/loss_rec": loss_rec, "train/loss_adv": loss_adv}
        self.log_dict({k: v.detach() for k, v in logs.items()}, prog_bar=True)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.autoencoder(x).float()

    def map_features(self, x: Tensor) -> Tensor:
        return self.discriminator.features(x)[0]  # D's first block, (B, width, S/2, S/2)

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        x = batch["x"]
        with torch.no_grad():
            x_hat = self.autoencoder(x).float()
            score, residual, discrimination = reconstruction_scores(
                self.discriminator, x, x_hat, self.hparams.lambda_score
            )
            pd = -self.discriminator(x).float()  # higher = judged less real
        return {
            "score": score,
            "residual": residual,
            "discrimination": discrimination,
            "pd": pd,
            "x_hat": x_hat,
            "amap": self.anomaly_map(x, x_hat),
        }
