"""Encoder-decoder generator G = G_de ∘ G_en and a patch discriminator (Sparse-GAN, Zhou et al.,
ISBI 2020, sec. 2.2), shared by the auto-encoder, pix2pix (#1, #2) and Sparse-GAN.

Depth follows the image size: ``n`` stride-2 4x4 convolutions, with ``n`` the fewest halvings
that bring the side to at most 7, and channels ``width * 2**i``. So ``image_size=224, width=64``
gives the paper's latent H_in of 1024 x 7 x 7 (5 stages: 64-128-256-512-1024), ``64`` gives
``8 * width`` x 4 x 4 and the tests' ``16`` gives ``2 * width`` x 4 x 4.

No skip connections (unlike pix2pix's U-Net): a skip would carry the input around the latent,
so the reconstruction would copy lesions and neither the image nor the latent score could see
them. The last encoder stage is conv -> BatchNorm without affine parameters -> ReLU: H_in is
non-negative, as the features of a class activation map (the AAM, eq. 8, is built on it). The
BatchNorm fixes the variance of the pre-activation per channel, not the energy after the ReLU,
and the decoder's first BatchNorm undoes any scale: a scale-dependent loss on H_in can still be
lowered by shrinking it (why Sparse-GAN's ``sparsity_mode`` defaults to a scale-free reading).

Memory format: weights and activations are channels-last (NHWC,
:func:`anogan_lightning.nets.common.channels_last`).
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.nets.common import channels_last, init_dcgan_weights, nhwc

MAX_LATENT_SIDE = 7  # 224 / 2**5, the paper's 7 x 7


def n_stages(image_size: int) -> int:
    """Stride-2 stages from ``image_size`` down to a side of at most 7 (exact halvings)."""
    n, side = 0, image_size
    while side > MAX_LATENT_SIDE:
        if side % 2:
            raise ValueError(
                f"image_size {image_size} does not halve exactly down to a side <= "
                f"{MAX_LATENT_SIDE} (e.g. 16, 32, 64, 112, 224)"
            )
        side //= 2
        n += 1
    if n == 0:
        raise ValueError(f"image_size must be > {MAX_LATENT_SIDE}, got {image_size}")
    return n


def stage_channels(width: int, image_size: int, latent_channels: int | None = None) -> list[int]:
    """Encoder channels per stage: width * 2**i, the last replaced by ``latent_channels``."""
    chans = [width * 2**i for i in range(n_stages(image_size))]
    if latent_channels:
        chans[-1] = latent_channels
    return chans


def down_stack(channels: int, chans: list[int]) -> list[nn.Module]:
    """Stride-2 4x4 convolutions ``channels`` -> chans[0] -> ..., each followed by BatchNorm
    (but the first, as in DCGAN / pix2pix) and LeakyReLU 0.2."""
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip([channels] + chans[:-1], chans, strict=True)):
        layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0))
        if i > 0:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class Encoder(nn.Module):
    """G_en (and E, which shares its weights): x (B, C, S, S) -> H (B, C_h, s, s), H >= 0.

    s = S / 2**n <= 7; C_h = ``latent_channels`` or width * 2**(n-1).
    """

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        chans = stage_channels(width, image_size, latent_channels)
        c_in = ([channels] + chans)[-2]  # into the last stage
        self.net = nn.Sequential(
            *down_stack(channels, chans[:-1]),
            # the latent: non-negative, unit-variance pre-activation (module docstring)
            nn.Conv2d(c_in, chans[-1], 4, 2, 1, bias=False),
            nn.BatchNorm2d(chans[-1], affine=False),
            nn.ReLU(inplace=True),
        )
        self.out_channels = chans[-1]
        self.out_size = image_size // 2 ** len(chans)
        init_dcgan_weights(self)
        channels_last(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(nhwc(x))


class Decoder(nn.Module):
    """G_de: H (B, C_h, s, s) -> x_hat (B, C, S, S) in [-1, 1]."""

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        chans = stage_channels(width, image_size, latent_channels)[
            ::-1
        ]  # 224: 1024, 512, 256, 128, 64
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans, chans[1:] + [channels], strict=True)):
            last = i == len(chans) - 1
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)
        channels_last(self)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(nhwc(h))


class EncoderDecoder(nn.Module):
    """G = G_de ∘ G_en; ``forward`` returns (x_hat (B, C, S, S), H_in (B, C_h, s, s))."""

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(channels, width, image_size, latent_channels)
        self.decoder = Decoder(channels, width, image_size, latent_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.decoder(h), h


class PatchDiscriminator(nn.Module):
    """D: x (B, C, S, S) -> patch logits (B, s * s), one per latent-resolution patch.

    The encoder's conv stack (LeakyReLU, BatchNorm after the first layer) and a 3x3 conv to one
    logit per position: pix2pix's PatchGAN, unconditional (it judges I_in against I_re).
    """

    def __init__(self, channels: int = 1, width: int = 64, image_size: int = 224) -> None:
        super().__init__()
        chans = stage_channels(width, image_size)
        self.features = nn.Sequential(*down_stack(channels, chans))
        self.head = nn.Conv2d(chans[-1], 1, 3, 1, 1)
        init_dcgan_weights(self)
        channels_last(self)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(patch logits (B, s * s), last hidden block f(x) (B, width * 2**(n-1), s, s))."""
        f = self.features(nhwc(x))
        return self.head(f).flatten(1), f

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]
