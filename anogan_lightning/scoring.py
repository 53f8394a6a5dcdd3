"""Stateless scoring: latent mappings (AnoGAN, GAN_R), reconstruction and feature scores
(aCAE, f-AnoGAN, the auto-encoder and pix2pix), anomaly maps (residual, Sparse-GAN's AAM).

Shapes: x (B, C, H, W) in [-1, 1]; z (B, latent_dim); score (B,); amap (B, 1, H, W).
Scores are raw (no min-max normalisation): AUROC only needs their order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from anogan_lightning.losses import reference_discrimination_loss


def residual_map(x: Tensor, x_hat: Tensor) -> Tensor:
    """|x - x_hat| averaged over channels: (B, 1, H, W)."""
    return (x - x_hat).abs().mean(1, keepdim=True)


def l1_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """sum |a - b| over all but the batch dimension: (B,)."""
    return (a - b).abs().flatten(1).sum(1)


def mean_sq(a: Tensor, b: Tensor) -> Tensor:
    """mean (a - b)^2 over all but the batch dimension: (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def latent_stats(h: Tensor) -> dict[str, Tensor]:
    """Collapse monitors of a latent H (B, ...): E[H^2], the fraction of exact zeros and the
    between-image variance (mean over features of the variance across the batch)."""
    h = h.float().flatten(1)
    return {
        "train/h_energy": h.pow(2).mean(),
        "train/h_zeros": (h == 0).float().mean(),
        "train/h_between_var": h.var(0).mean() if len(h) > 1 else h.new_zeros(()),
    }


def anomaly_activation_map(
    h_in: Tensor, h_re: Tensor, size: tuple[int, int] | None = None
) -> Tensor:
    """AAM (Sparse-GAN eq. 8): w = |GAP(H_in) - GAP(H_re)|, map = sum_c w_c H_in[c].

    h_in, h_re (B, C, h, w) -> (B, 1, h, w), or (B, 1, *size) upsampled bilinearly.
    """
    h_in, h_re = h_in.float(), h_re.float()
    w = (h_in.mean((2, 3)) - h_re.mean((2, 3))).abs()  # (B, C) channel weights
    amap = torch.einsum("bc,bchw->bhw", w, h_in).unsqueeze(1)
    if size is not None:
        amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
    return amap


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; the previous state after it."""
    states = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval()
            m.requires_grad_(False)
        yield
    finally:
        for m, training, flags in states:
            m.train(training)
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)


@dataclass
class Mapping:
    """Result of :func:`map_latent` at the last step Γ."""

    z: Tensor  # (B, latent_dim)
    x_hat: Tensor  # (B, C, H, W), G(z_Γ)
    residual: Tensor  # (B,) R(x) = sum |x - G(z_Γ)|
    discrimination: Tensor  # (B,) D(x) = sum |f(x) - f(G(z_Γ))|
    score: Tensor  # (B,) A(x) = (1 - λ) R(x) + λ D(x)
    loss_history: Tensor  # (steps + 1,) batch-mean L(z) before each step and after the last


def map_latent(
    generator: nn.Module, discriminator: nn.Module, x: Tensor, z_init: Tensor, **options
) -> Mapping:
    """AnoGAN latent mapping (Schlegl et al. 2017, sec. 2.2, eq. 5), a whole batch at once.

    Minimises L(z) = (1 - λ) L_R(z) + λ L_D(z) over z only, with L_R = Σ|x - G(z)| and
    L_D = Σ|f(x) - f(G(z))|, f = ``discriminator.forward_with_features(.)[1]``. The per-sample
    losses are summed, and G and D run in eval mode, so each sample's z gets exactly the gradient
    it would get alone; Adam is element-wise, so the batch maps as each image would one by one.
    z is kept in U(-1, 1)^d, the prior's support, by clamping after each step (``clamp``).
    z, the losses and the optimizer state stay float32 under mixed precision.
    Needs autograd: call outside ``torch.inference_mode``. ``options``: ``steps``, ``lam``,
    ``lr``, ``clamp``, ``progress`` of :func:`map_latent_with`.
    """
    with frozen(discriminator), torch.no_grad():
        f_x = discriminator.forward_with_features(x.float())[1].float()  # f(x), fixed

    def feature_matching(x_hat: Tensor) -> Tensor:  # L_D(z) = Σ|f(x) - f(G(z))|, (B,)
        return l1_per_sample(f_x, discriminator.forward_with_features(x_hat)[1].float())

    return map_latent_with(
        generator, x, z_init, feature_matching, frozen_modules=(discriminator,), **options
    )


def map_latent_with(
    generator: nn.Module,
    x: Tensor,
    z_init: Tensor,
    discrimination: Callable[[Tensor], Tensor],
    steps: int = 500,
    lam: float = 0.1,
    lr: float = 0.01,
    clamp: bool = True,
    progress: bool = False,
    frozen_modules: tuple[nn.Module, ...] = (),
) -> Mapping:
    """AnoGAN's latent mapping with a pluggable discrimination term (batched, as
    :func:`map_latent`).

    Minimises L(z) = (1 - λ)·Σ|x - G(z)| + λ·discrimination(G(z)) over z only;
    ``discrimination`` maps x_hat (B, C, H, W) to a per-sample loss (B,). ``generator`` and
    ``frozen_modules`` (the networks ``discrimination`` uses) are in eval mode without
    parameter gradients during the search. Same Adam, clamping to [-1, 1] and float32
    bookkeeping as :func:`map_latent`; ``Mapping.discrimination`` holds the term at z_Γ.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "latent mapping needs gradients at test time: run the Trainer with "
            "inference_mode=False (the method's config sets trainer.inference_mode=false)"
        )
    x = x.float()
    z = z_init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    history = []
    with frozen(generator, *frozen_modules), torch.enable_grad():
        steps_iter = range(steps + 1)
        if progress:
            steps_iter = tqdm(steps_iter, desc="latent mapping", leave=False, unit="step")
        for step in steps_iter:
            x_hat = generator(z).float()
            residual = l1_per_sample(x, x_hat)
            disc = discrimination(x_hat).float()
            loss = (1 - lam) * residual + lam * disc  # (B,)
            history.append(loss.detach().mean())
            if step == steps:  # losses at z_Γ, after the last update
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if clamp:
                with torch.no_grad():
                    z.clamp_(-1, 1)
    return Mapping(
        z=z.detach(),
        x_hat=x_hat.detach(),
        residual=residual.detach(),
        discrimination=disc.detach(),
        score=loss.detach(),
        loss_history=torch.stack(history),
    )


def map_latent_reference(
    generator: nn.Module, discriminator: nn.Module, x: Tensor, z_init: Tensor, **options
) -> Mapping:
    """GANR's mapping (AnoGAN sec. 2.2-2.3 with Yeh et al.'s reference discrimination loss):
    L(z) = (1 - λ)·Σ|x - G(z)| + λ·L̂_D(z), L̂_D = sigmoid cross-entropy of D(G(z)) against 1.

    ``Mapping.discrimination`` is D̂(x) = L̂_D(z_Γ) and ``Mapping.score`` is
    Â(x) = (1 - λ)·R(x) + λ·D̂(x). ``options`` as for :func:`map_latent`.
    """

    def reference(x_hat: Tensor) -> Tensor:  # L̂_D(z), (B,)
        return reference_discrimination_loss(discriminator(x_hat))

    return map_latent_with(
        generator, x, z_init, reference, frozen_modules=(discriminator,), **options
    )


def reconstruction_scores(
    discriminator: nn.Module, x: Tensor, x_hat: Tensor, lam: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """AnoGAN's A(x) on a given reconstruction (no latent search), e.g. an autoencoder's:
    (A, R, D), each (B,), with R = Σ|x - x_hat|, D = Σ|f(x) - f(x_hat)|, A = (1 - λ)R + λD,
    f = ``discriminator.forward_with_features(.)[1]``. Call under no_grad / inference mode.
    """
    x, x_hat = x.float(), x_hat.float()
    f_x = discriminator.forward_with_features(x)[1].float()
    f_hat = discriminator.forward_with_features(x_hat)[1].float()
    residual = l1_per_sample(x, x_hat)
    discrimination = l1_per_sample(f_x, f_hat)
    return (1 - lam) * residual + lam * discrimination, residual, discrimination


def izif_scores(
    x: Tensor, x_hat: Tensor, f_x: Tensor, f_hat: Tensor, kappa: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """f-AnoGAN's izi_f loss, which is also its anomaly score, per sample (Schlegl et al. 2019):
    (A, A_R, A_D), each (B,), with A_R = (1/n)·||x - G(E(x))||² over the n pixels,
    A_D = (1/n_d)·||f(x) - f(G(E(x)))||² over the n_d critic features, A = A_R + κ·A_D.
    """
    residual = (x.float() - x_hat.float()).pow(2).flatten(1).mean(1)
    feature = (f_x.float() - f_hat.float()).pow(2).flatten(1).mean(1)
    return residual + kappa * feature, residual, feature
