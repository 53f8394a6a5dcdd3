"""f-AnoGAN's encoder E: image -> latent code, the critic's residual down-path ending in tanh.

As in the reference code (tSchlegl/f-AnoGAN ``z_encoding_izif.py``): the same stem and
down-residual blocks as the WGAN-GP critic, but with batch norm (the reference normalises every
non-critic network with batch norm), then Linear (8d*4*4 -> latent_dim) and tanh, so E(x) lies
in (-1, 1)^latent_dim, the support of the uniform prior the generator was trained on
(f-AnoGAN's izi_f encoder).

:class:`DCGANEncoder` is the encoder of f-AnoGAN's ``arch="dcgan"``: aCAE's encoder (the DCGAN
discriminator's convolutions with batch norm, then Linear) and the same tanh.
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.nets.acae import ConvEncoder
from anogan_lightning.nets.wgan import ResNetDownPath


class ResNetEncoder(nn.Module):
    """x (B, channels, S, S) in [-1, 1] -> z (B, latent_dim) in (-1, 1)."""

    def __init__(
        self, latent_dim: int = 128, channels: int = 1, width: int = 64, image_size: int = 64
    ) -> None:
        super().__init__()
        self.body = ResNetDownPath(channels, width, image_size, norm="batch")
        self.head = nn.Linear(self.body.out_features, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).tanh()


class DCGANEncoder(ConvEncoder):
    """x (B, channels, S, S) in [-1, 1] -> z (B, latent_dim) in (-1, 1): aCAE's DCGAN encoder
    (PyTorch's default initialisation) ending in tanh."""

    def __init__(
        self, latent_dim: int = 128, channels: int = 1, width: int = 64, image_size: int = 64
    ) -> None:
        super().__init__(latent_dim, channels, width, image_size, dcgan_init=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).tanh()
