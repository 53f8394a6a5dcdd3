"""WGAN-GP residual generator and critic (Gulrajani et al. 2017, "ResNet" 64x64 model) as used by
f-AnoGAN (Schlegl et al., MedIA 2019).

Layout of the reference code (tSchlegl/f-AnoGAN ``wgangp_64x64.py``, from igul222's
improved_wgan_training) at ``image_size=64``, ``width=d=64``:

- generator: Linear z -> (8d, 4, 4); 4 up-residual blocks 8d-8d, 8d-4d, 4d-2d, 2d-d; BN, ReLU,
  3x3 conv to ``channels``, tanh.
- critic: 3x3 conv ``channels`` -> d; 4 down-residual blocks d-2d, 2d-4d, 4d-8d, 8d-8d, each
  normalised by layer norm (no batch norm: the gradient penalty is per sample, and batch norm
  would couple the samples of a batch); flatten (B, 8d*4*4) -> Linear -> logit. The flattened
  output of the last block is f(.), the features izi_f and the f-AnoGAN score compare.

Residual blocks are pre-activation (norm, ReLU, conv, norm, ReLU, conv) with 3x3 kernels;
``up``: nearest-neighbour x2 before the first conv (the reference's depth_to_space of four
copies is exactly that), ``down``: 2x2 mean pool after the second conv; the shortcut is a 1x1
conv (after the upsample / before the pool) when the shape changes. The number of resampling
blocks follows the image size, log2(image_size / 4), so tests can run at 16x16.

``arch="dcgan"`` of f-AnoGAN (:class:`DCGANCritic` here, the generator is AnoGAN's
``nets.dcgan.DCGANGenerator``, the encoder ``nets.encoder.DCGANEncoder``): the DCGAN
architecture that Gulrajani et al. also train with WGAN-GP (their sec. 5), with layer norm in
the critic instead of batch norm. It has no full-resolution convolutions (each 5x5 conv
halves the size), so a critic update costs several times less than the residual pair's at the
CPU widths and a CPU budget buys many more generator updates (timings in
experiments/notes/2026-12-02-fanogan-networks-for-a-cpu-budget.md).

Choices: layer norm over (C, H, W) with a per-channel scale and shift is ``GroupNorm(1, C)``
(the reference's ``Layernorm([1, 2, 3])`` with per-channel offset/scale); weights keep PyTorch's
default init (the reference uses He/Glorot uniform; both are variance-preserving).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from anogan_lightning.nets.common import n_halvings
from anogan_lightning.nets.dcgan import down_blocks, down_channels


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C, H, W), per-channel affine
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


class ResidualBlock(nn.Module):
    """Pre-activation residual block, (B, c_in, H, W) -> (B, c_out, H', W').

    ``resample``: ``"up"`` (H' = 2H), ``"down"`` (H' = H/2) or ``None``.
    """

    def __init__(
        self, c_in: int, c_out: int, resample: str | None, norm: str, bias: bool = True
    ) -> None:
        super().__init__()
        if resample not in ("up", "down", None):
            raise ValueError(f"resample must be 'up', 'down' or None, got {resample!r}")
        self.resample = resample
        c_mid = c_out if resample == "up" else c_in  # the reference's conv_1 output width
        self.norm1 = _norm(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1, bias=bias)
        same = c_in == c_out and resample is None
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        skip = x
        if self.resample == "up":
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        elif self.resample == "down":
            skip = F.avg_pool2d(skip, 2)
        if self.shortcut is not None:
            skip = self.shortcut(skip)  # 1x1 conv after up / after pool (MeanPoolConv)
        h = F.relu(self.norm1(x))
        if self.resample == "up":
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        if self.resample == "down":
            h = F.avg_pool2d(h, 2)  # ConvMeanPool
        return skip + h


def critic_channels(width: int, image_size: int) -> list[int]:
    """Channels after the stem and after each down block: 64x64, d=64: 64, 128, 256, 512, 512."""
    n = n_halvings(image_size)
    return [width * min(2**i, 8) for i in range(n + 1)]


class ResNetGenerator(nn.Module):
    """z (B, latent_dim) -> x (B, channels, S, S) in [-1, 1]; batch norm in the blocks."""

    def __init__(
        self, latent_dim: int = 128, channels: int = 1, width: int = 64, image_size: int = 64
    ) -> None:
        super().__init__()
        n = n_halvings(image_size)
        outs = [width * min(2 ** (n - 1 - i), 8) for i in range(n)]  # 64x64: 8d, 4d, 2d, d
        ins = [outs[0]] + outs[:-1]  # 64x64: 8d, 8d, 4d, 2d
        self.latent_dim = latent_dim
        self.start = ins[0]
        self.project = nn.Linear(latent_dim, ins[0] * 16)  # z -> (8d, 4, 4)
        self.blocks = nn.Sequential(
            *[ResidualBlock(i, o, "up", "batch") for i, o in zip(ins, outs, strict=True)]
        )
        self.out_norm = nn.BatchNorm2d(outs[-1])
        self.out_conv = nn.Conv2d(outs[-1], channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.blocks(self.project(z).view(-1, self.start, 4, 4))
        return self.out_conv(F.relu(self.out_norm(h))).tanh()


class ResNetDownPath(nn.Module):
    """3x3 stem + down blocks: x (B, channels, S, S) -> (B, 8d, 4, 4) at 64x64 (critic, encoder)."""

    def __init__(
        self, channels: int, width: int, image_size: int, norm: str, last_bias: bool = True
    ) -> None:
        super().__init__()
        chans = critic_channels(width, image_size)
        self.stem = nn.Conv2d(channels, chans[0], 3, padding=1)
        pairs = list(zip(chans[:-1], chans[1:], strict=True))
        self.blocks = nn.Sequential(
            *[
                ResidualBlock(i, o, "down", norm, bias=last_bias or k < len(pairs) - 1)
                for k, (i, o) in enumerate(pairs)
            ]
        )
        self.out_features = chans[-1] * 16

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).flatten(1)  # (B, out_features)


class ResNetCritic(nn.Module):
    """x (B, channels, S, S) -> unbounded critic value (B,); layer norm, no batch norm.

    ``features(x)`` is f(x), (B, 8*width*16) at 64x64: the input of the last (linear) layer.
    The head and the last block's output convolutions have no bias: a constant added to the
    critic value or to f(x) cancels in E[C(x̃)] - E[C(x)], in ∇C and in f(x) - f(x̂), so such
    biases would never receive a gradient.
    """

    def __init__(self, channels: int = 1, width: int = 64, image_size: int = 64) -> None:
        super().__init__()
        self.body = ResNetDownPath(channels, width, image_size, norm="layer", last_bias=False)
        self.head = nn.Linear(self.body.out_features, 1, bias=False)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def first_block(self, x: Tensor) -> Tensor:
        """The output of the stem and first block, (B, 2d, S/2, S/2): f-AnoGAN's map features."""
        return self.body.blocks[0](self.body.stem(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(critic value (B,), f(x) (B, n_features)) in one pass."""
        f = self.body(x)
        return self.head(f).squeeze(1), f

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).squeeze(1)


class DCGANCritic(nn.Module):
    """x (B, channels, S, S) -> unbounded critic value (B,): the DCGAN discriminator's strided 5x5
    convolutions (channels d, 2d, 4d, 8d at 64x64) with layer norm instead of batch norm, then a
    linear head without bias (a constant cancels in the WGAN-GP losses, as in
    :class:`ResNetCritic`). ``features(x)``: the flattened last block, (B, 8d*4*4) at 64x64."""

    def __init__(self, channels: int = 1, width: int = 64, image_size: int = 64) -> None:
        super().__init__()
        chans = down_channels(width, image_size)
        self.blocks = nn.Sequential(
            *[nn.Sequential(*b) for b in down_blocks(channels, chans, norm="layer")]
        )
        self.out_features = chans[-1] * 16
        self.head = nn.Linear(self.out_features, 1, bias=False)

    def features(self, x: Tensor) -> Tensor:
        return self.blocks(x).flatten(1)

    def first_block(self, x: Tensor) -> Tensor:
        """The first block's output, (B, d, S/2, S/2): f-AnoGAN's map features."""
        return self.blocks[0](x)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(critic value (B,), f(x) (B, n_features)) in one pass."""
        f = self.features(x)
        return self.head(f).squeeze(1), f

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)
