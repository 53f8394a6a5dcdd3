"""Training and discrimination losses shared by the GAN methods (plain functions on tensors).

Logits are raw network outputs, (B,) or a PatchGAN's (B, P); ``critic`` values are unbounded Wasserstein critic outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bce_discriminator_loss(
    logit_real: Tensor, logit_fake: Tensor, real_label: float = 1.0
) -> Tensor:
    """-log D(x) - log(1 - D(x_fake)), batch means (Goodfellow et al. 2014, eq. 1).

    Logits of any shape: (B,) from a DCGAN discriminator, (B, P) from a PatchGAN (a mean over
    patches). ``real_label`` < 1 is one-sided label smoothing of the real targets (Salimans et
    al. 2016). Computed in float32 (also under mixed precision).
    """
    logit_real, logit_fake = logit_real.float(), logit_fake.float()
    real = F.binary_cross_entropy_with_logits(logit_real, torch.full_like(logit_real, real_label))
    return real + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))


def bce_generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating generator loss -log D(x_fake), batch mean, float32."""
    logit_fake = logit_fake.float()
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def reference_discrimination_loss(logit: Tensor) -> Tensor:
    """GANR's L̂_D (AnoGAN sec. 2.2, after Yeh et al. 2016): sigmoid cross-entropy of D(G(z))
    against the target "real" (1), per sample: -log σ(logit) = softplus(-logit), (B,)."""
    return F.softplus(-logit)


def wasserstein_critic_loss(critic_real: Tensor, critic_fake: Tensor) -> Tensor:
    """E[C(x_fake)] - E[C(x)], the critic's part of WGAN-GP (Gulrajani et al. 2017, eq. 3)."""
    return critic_fake.mean() - critic_real.mean()


def wasserstein_generator_loss(critic_fake: Tensor) -> Tensor:
    """-E[C(G(z))]."""
    return -critic_fake.mean()


def gradient_penalty(
    critic: nn.Module, real: Tensor, fake: Tensor, alpha: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """WGAN-GP penalty without its weight λ (Gulrajani et al. 2017, eq. 3):
    E[(||∇_x̂ C(x̂)||₂ - 1)²] with x̂ = α·x + (1 - α)·x̃, α ~ U[0, 1] per sample.

    ``real`` and ``fake`` (B, C, H, W) are treated as constants; ``alpha`` (B,) can be given
    (tests). The graph is kept (``create_graph``) so the penalty back-propagates into the
    critic's parameters. ``eps`` inside the square root keeps the norm differentiable at a zero
    gradient.
    """
    b = real.shape[0]
    if alpha is None:
        alpha = torch.rand(b, device=real.device, dtype=real.dtype)
    alpha = alpha.view(b, *([1] * (real.dim() - 1)))
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        out = critic(x_hat)
        (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + eps)  # (B,)
    return ((norm - 1) ** 2).mean()
