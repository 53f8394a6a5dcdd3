"""Convolutional auto-encoder: the "Auto-Encoder" row of the Sparse-GAN paper's Table 1 (Zhou et
al., ISBI 2020).

The network is the generator of pix2pix and Sparse-GAN (``nets.pix2pix.EncoderDecoder``: same
encoder, same latent, same decoder) trained with L_re = ||x - G(x)||_1 (mean per pixel, Sparse-GAN
eq. 1) alone, so that this row differs from pix2pix #1 only by the adversarial term. Score: the
mean squared reconstruction error per image, ``score``. Components: ``l1``, the mean absolute
error, and ``latent``, ||G_en(x) - G_en(G(x))||^2 / (C h w) (pix2pix #2's score on a
non-adversarial model: the #2 vs AE comparison without training another model). Anomaly map:
``map`` of :func:`anogan_lightning.scoring.anomaly_map` (``map=residual map_sigma=0``: the
residual |x - G(x)|). Adam, plain automatic optimisation.
"""

from __future__ import annotations

from torch import Tensor

from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.nets.common import nhwc
from anogan_lightning.nets.pix2pix import EncoderDecoder
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, mean_sq


class AutoEncoder(AnomalyModule):
    """x -> G_de(G_en(x)); reconstruction-error score."""

    components = ("l1", "latent")

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        latent_channels: int | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generator = EncoderDecoder(channels, width, image_size, latent_channels)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.generator(x)[0].float()

    def map_features(self, x: Tensor) -> Tensor:
        return self.generator.encoder.net[:2](nhwc(x))  # G_en's first stage, (B, width, S/2, S/2)

    def configure_optimizers(self):
        return self.adam(self.generator.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if batch is None:
            return None
        x = batch["x"]
        x_hat, _ = self.generator(x)
        loss = (x - x_hat).abs().mean()  # L_re, eq. 1
        self.check_finite(**{"train/loss": loss})
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        x = batch["x"]
        x_hat, h_in = self.generator(x)
        h_re = self.generator.encoder(x_hat)
        x_hat = x_hat.float()
        return {
            "score": mean_sq(x, x_hat),
            "l1": (x.float() - x_hat).abs().flatten(1).mean(1),
            "latent": mean_sq(h_in, h_re),
            "x_hat": x_hat,
            "amap": self.anomaly_map(x, x_hat),
        }
