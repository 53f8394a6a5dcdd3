"""Helpers shared by the networks: depth from the image size, DCGAN initialisation, layout."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def n_halvings(image_size: int) -> int:
    """Stride-2 layers (or resampling blocks) between 4 x 4 and ``image_size``:
    log2(image_size / 4), 4 at 64 x 64."""
    n = int(math.log2(image_size)) - 2
    if image_size < 8 or 2 ** (n + 2) != image_size:
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return n


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv and linear weights with zero biases, N(1, 0.02) batch-norm scales with
    zero shifts (DCGAN, Radford et al. 2016; pix2pix); norms without affine parameters as they are."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def channels_last(module: nn.Module) -> nn.Module:
    """The module's 4-D parameters and buffers in channels-last layout (in place).

    The same numbers, but oneDNN's CPU convolutions skip their layout reorders around every
    (transposed) convolution, and on GPUs it is the layout tensor-core convolutions want
    (speed-ups in experiments/notes/2026-12-01-figures-behind-design-choices.md).
    """
    return module.to(memory_format=torch.channels_last)


def nhwc(x: Tensor) -> Tensor:
    """x as a channels-last tensor (no copy when it already is one)."""
    return x.contiguous(memory_format=torch.channels_last)
