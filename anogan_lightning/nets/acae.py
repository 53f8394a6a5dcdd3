"""Adversarial convolutional autoencoder (aCAE), the baseline of AnoGAN's Table 1.

AnoGAN (sec. 3) compares against "an adversarial convolutional autoencoder" with an
architecture comparable to its DCGAN and gives no further detail. Here the encoder mirrors the
DCGAN discriminator (log2(S/4) strided 5x5 convolutions, 64-128-256-512 channels at
``width=64``, batch norm after all but the first, LeakyReLU 0.2) followed by a linear layer to
a ``latent_dim`` bottleneck; the decoder *is* AnoGAN's DCGAN generator (4 fractionally-strided
5x5 convolutions, 512-256-128-64, tanh). So encoder + decoder have the depth of D + G, and the
adversary (a DCGAN discriminator, built by the method) has AnoGAN's.

The bottleneck is a dense ``latent_dim`` code (Linear from the encoder's (8d, 4, 4) output,
the generator's Linear back), like a GAN's z but not sampled from a prior, so no tanh. (A
convolutional (8d, 4, 4) code was tried on kermany-mini and scored lower: it reconstructs
lesions too; see experiments/notes/2026-11-30-anogan-family-on-kermany-mini.md.)
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.nets.common import init_dcgan_weights
from anogan_lightning.nets.dcgan import DCGANGenerator, down_blocks, down_channels


class ConvEncoder(nn.Module):
    """x (B, channels, S, S) -> code (B, latent_dim); DCGAN-discriminator layout.

    ``dcgan_init``: DCGAN's N(0, 0.02) weights (aCAE), else PyTorch's default initialisation
    (f-AnoGAN's ``nets.encoder.DCGANEncoder``, as its residual encoder)."""

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 1,
        width: int = 64,
        image_size: int = 64,
        dcgan_init: bool = True,
    ) -> None:
        super().__init__()
        chans = down_channels(width, image_size)  # 64x64: 64, 128, 256, 512
        self.net = nn.Sequential(*[m for b in down_blocks(channels, chans) for m in b])
        self.head = nn.Linear(chans[-1] * 16, latent_dim)  # (C, 4, 4) -> code
        if dcgan_init:
            init_dcgan_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x).flatten(1))


class ConvAutoencoder(nn.Module):
    """x (B, channels, S, S) -> reconstruction (B, channels, S, S) in [-1, 1]."""

    def __init__(
        self, latent_dim: int = 100, channels: int = 1, width: int = 64, image_size: int = 64
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(latent_dim, channels, width, image_size)
        self.decoder = DCGANGenerator(latent_dim, channels, width, image_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
