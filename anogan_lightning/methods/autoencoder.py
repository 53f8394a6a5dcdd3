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

``noise_std`` > 0 trains it as a denoising auto-encoder with coarse noise (Kascenas et al.,
"Denoising autoencoders for unsupervised anomaly detection in brain MRI", MIDL 2022, sec. 2):
the input is x plus Gaussian noise drawn on a ``noise_res`` x ``noise_res`` grid and upsampled
bilinearly to the image (at a random sub-cell offset, so that no grid is learned), and the
target is the clean x. A plain auto-encoder of this size copies what it is shown, a dark fluid
pocket included (its latent holds half as many numbers as the window has pixels); trained to
remove smooth, lesion-sized perturbations, it replaces what it has not seen by normal tissue,
so the residual stays where the lesion is. Scoring reads the clean input. The noise is in the
units of x ([-1, 1]); 0 (the default) is the paper's auto-encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.nets.common import nhwc
from anogan_lightning.nets.pix2pix import EncoderDecoder
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, mean_sq


def coarse_noise(x: Tensor, std: float, res: int) -> Tensor:
    """Gaussian noise like ``x`` (B, C, H, W) of standard deviation ``std`` per grid node, drawn
    on a ``res`` x ``res`` grid (one cell more each way) and upsampled bilinearly to the image
    at a random sub-cell offset: smooth at the scale of H / ``res`` pixels."""
    if res < 1:
        raise ValueError(f"noise_res={res}: need >= 1 grid cell")
    b, c, h, w = x.shape
    cell_h, cell_w = -(-h // res), -(-w // res)  # ceil
    grid = torch.randn(b, c, res + 1, res + 1, device=x.device, dtype=torch.float32) * std
    big = F.interpolate(grid, size=(cell_h * (res + 1), cell_w * (res + 1)), mode="bilinear")
    dy = int(torch.randint(cell_h, ()).item())
    dx = int(torch.randint(cell_w, ()).item())
    return big[..., dy : dy + h, dx : dx + w].to(x.dtype)


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
        noise_std: float = 0.0,
        noise_res: int = 16,
    ) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std}: need >= 0 (0 = no input noise)")
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
        x_in = x
        if self.hparams.noise_std > 0:  # denoising: corrupted in, clean target
            x_in = x + coarse_noise(x, self.hparams.noise_std, self.hparams.noise_res)
        x_hat, _ = self.generator(x_in)
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
