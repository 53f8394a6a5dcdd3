"""Encoder-decoder generator G = G_de ∘ G_en and a patch discriminator (Sparse-GAN, Zhou et al.,
ISBI 2020, sec. 2.2), shared by the auto-encoder, pix2pix (#1, #2) and Sparse-GAN.

Depth follows the image size: ``n`` stride-2 4x4 convolutions, with ``n`` the fewest halvings
that bring the side to at most 7, and channels ``width * 2**i``. So ``image_size=224, width=64``
gives the paper's latent H_in of 1024 x 7 x 7 (5 stages: 64-128-256-512-1024), ``64`` gives
``8 * width`` x 4 x 4 and the tests' ``16`` gives ``2 * width`` x 4 x 4.

No skip connections (unlike pix2pix's U-Net): a skip would carry the input around the latent,
so the reconstruction would copy lesions and neither the image nor the latent score could see
them. The last encoder stage is conv -> BatchNorm without affine parameters -> ReLU: H_in is
non-negative, as the features of a class activation map (the AAM, eq. 8, is built on it), and
its per-channel scale is fixed, so no loss on H_in (the SRN's L_sp, the latent score) can be
lowered by shrinking it (the decoder's first BatchNorm would undo any scale).

Memory format: weights and activations are channels-last (NHWC). Same numbers, but oneDNN's
convolutions skip their layout reorders: scoring at 224 x 224, batch 32, width 64 runs 1.35x
faster on CPU and a training step 1.15x (benchmarks/sparse_gan.py); on GPUs it is the layout
tensor-core convolutions want.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) norm scales (DCGAN / pix2pix)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def channels_last(module: nn.Module) -> nn.Module:
    """The module's 4-D parameters and buffers in channels-last layout (in place)."""
    return module.to(memory_format=torch.channels_last)


def nhwc(x: Tensor) -> Tensor:
    """x as a channels-last tensor (no copy when it already is one)."""
    return x.contiguous(memory_format=torch.channels_last)


def _down(c_in: int, c_out: int, norm: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not norm)] + (
        [nn.BatchNorm2d(c_out)] if norm else []
    )


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
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([channels] + chans[:-1], chans, strict=True)):
            if i == len(chans) - 1:  # the latent: fixed scale, non-negative (module docstring)
                layers += [
                    nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                    nn.BatchNorm2d(c_out, affine=False),
                    nn.ReLU(inplace=True),
                ]
            else:  # no norm on the first layer, as in DCGAN / pix2pix
                layers += _down(c_in, c_out, norm=i > 0) + [nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers)
        self.out_channels = chans[-1]
        self.out_size = image_size // 2 ** len(chans)
        init_weights(self)
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
        init_weights(self)
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
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([channels] + chans[:-1], chans, strict=True)):
            layers += _down(c_in, c_out, norm=i > 0) + [nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(chans[-1], 1, 3, 1, 1)
        init_weights(self)
        channels_last(self)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(patch logits (B, s * s), last hidden block f(x) (B, width * 2**(n-1), s, s))."""
        f = self.features(nhwc(x))
        return self.head(f).flatten(1), f

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # shapes at the paper's size
    g = EncoderDecoder(1, 64, 224)
    x_hat, h = g(torch.zeros(2, 1, 224, 224))
    print(tuple(x_hat.shape), tuple(h.shape), count_parameters(g))
