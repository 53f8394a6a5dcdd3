"""DCGAN generator and discriminator (Radford et al. 2016) as used by AnoGAN (Schlegl et al. 2017).

AnoGAN's grayscale variant: 5x5 kernels, stride 2, channels 512-256-128-64 for a 64x64 image
(``width=64``), z 100-dim. Depth follows the image size: log2(image_size / 4) strided layers, so
``image_size=64`` gives the paper's 4 fractionally-strided convolutions and 4 convolutions.

Weights and activations are channels-last (NHWC,
:func:`anogan_lightning.nets.common.channels_last`).

:func:`recalibrate_batch_norm` replaces a network's batch-norm running statistics by those of
given batches (the AnoGAN family recalibrates its discriminator on real normal images after
training); the discriminator's ``calibrated`` buffer records that it was done, so the flag
travels with its statistics in every state dict.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from anogan_lightning.nets.common import channels_last, init_dcgan_weights, n_halvings, nhwc


def down_channels(width: int, image_size: int) -> list[int]:
    """Channels of the DCGAN discriminator's strided convolutions: 64, 128, 256, 512 at 64x64,
    ``width=64`` (also the aCAE encoder's and the f-AnoGAN DCGAN critic's)."""
    return [width * 2**i for i in range(n_halvings(image_size))]


def down_blocks(channels: int, chans: list[int], norm: str = "batch") -> list[list[nn.Module]]:
    """The DCGAN discriminator's strided 5x5 convolutions ``channels`` -> chans[0] -> ..., each
    followed by a norm (but the first, as in DCGAN) and LeakyReLU 0.2; layers per block.
    ``norm``: ``"batch"`` (DCGAN) or ``"layer"`` (layer norm over (C, H, W) with per-channel
    affine, ``GroupNorm(1, C)``: for a WGAN-GP critic, whose penalty is per sample)."""
    if norm not in ("batch", "layer"):
        raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")
    blocks = []
    for i, (c_in, c_out) in enumerate(zip([channels] + chans[:-1], chans, strict=True)):
        block = [nn.Conv2d(c_in, c_out, 5, 2, padding=2)]
        if i > 0:
            block.append(nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(1, c_out))
        block.append(nn.LeakyReLU(0.2, inplace=True))
        blocks.append(block)
    return blocks


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) -> x (B, channels, S, S) in [-1, 1]."""

    def __init__(
        self, latent_dim: int = 100, channels: int = 1, width: int = 64, image_size: int = 64
    ) -> None:
        super().__init__()
        n = n_halvings(image_size)
        chans = [width * 2 ** (n - 1 - i) for i in range(n)]  # 64x64: 512, 256, 128, 64
        self.latent_dim = latent_dim
        self.start = chans[0]
        self.project = nn.Linear(latent_dim, chans[0] * 16)  # z -> (chans[0], 4, 4)
        self.project_norm = nn.Sequential(nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:] + [channels], strict=True):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 5, 2, padding=2, output_padding=1))
            if c_out != channels:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)
        channels_last(self)

    def forward(self, z: Tensor) -> Tensor:
        h = nhwc(self.project(z).view(-1, self.start, 4, 4))
        return self.net(self.project_norm(h))


class DCGANDiscriminator(nn.Module):
    """x (B, channels, S, S) -> logit (B,); ``features(x)`` returns every hidden block's output.

    ``feature_layer`` indexes the hidden blocks (``-1``: the last, (B, 8*width, 4, 4) at 64x64);
    it is the f(.) of AnoGAN's feature-matching loss.
    """

    def __init__(
        self, channels: int = 1, width: int = 64, image_size: int = 64, feature_layer: int = -1
    ) -> None:
        super().__init__()
        n = n_halvings(image_size)
        chans = down_channels(width, image_size)
        self.blocks = nn.ModuleList(nn.Sequential(*b) for b in down_blocks(channels, chans))
        if not -n <= feature_layer < n:
            raise ValueError(f"feature_layer {feature_layer} out of range for {n} blocks")
        self.feature_layer = feature_layer % n
        self.head = nn.Linear(chans[-1] * 16, 1)
        # True once the batch-norm running statistics were recalibrated (recalibrate_batch_norm)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        init_dcgan_weights(self)
        channels_last(self)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # state dicts from before the flag: statistics as training left them
        state_dict.setdefault(prefix + "calibrated", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, x: Tensor) -> list[Tensor]:
        x = nhwc(x)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logit (B,), f(x) (B, C, h, w)) in one pass."""
        feats = self.features(x)
        logit = self.head(feats[-1].flatten(1)).squeeze(1)
        return logit, feats[self.feature_layer]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)[-1].flatten(1)).squeeze(1)


def sample_uniform_z(n: int, latent_dim: int, device=None, generator=None) -> Tensor:
    """AnoGAN's prior: z ~ U(-1, 1)^latent_dim."""
    return torch.rand(n, latent_dim, device=device, generator=generator) * 2 - 1


def recalibrate_batch_norm(
    module: nn.Module,
    batches: Iterable[Tensor],
    forward=None,
    norms: list[nn.Module] | None = None,
) -> int:
    """Set the running mean and variance of every batch norm in ``module`` to their average
    over ``batches`` (each (B, C, H, W), already on the module's device); returns the number of
    batches used.

    The statistics are reset and accumulated as a cumulative average (``momentum=None``) while
    ``module`` runs in train mode without gradients, as after training a network on exactly
    these batches; parameters are unchanged, and momenta and train/eval mode are restored.
    With no batches at all the previous statistics are kept and it is an error.

    ``forward`` (default ``module``) is what runs each batch; ``norms`` (default: every batch
    norm of ``module``) the layers recalibrated: when given, only they run in train mode and
    the rest of ``module`` in eval mode.
    """
    forward = module if forward is None else forward
    only = norms is not None
    if norms is None:
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    was_training = module.training
    n = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        module.train(not only)
        for m in norms:
            m.train()
        with torch.no_grad():
            for x in batches:
                forward(x)
                n += 1
    finally:
        for m, (momentum, mean, var) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if n == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        module.train(was_training)
    if n == 0:
        raise ValueError("recalibrate_batch_norm: no batches given; statistics left unchanged")
    return n
