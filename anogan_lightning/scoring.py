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


# -- anomaly maps of reconstruction methods (issue 12, item 5) ----------------------------------
#: ``map`` values of the reconstruction methods (:func:`anomaly_map`); "residual" is the paper's
ANOMALY_MAPS = ("residual", "dark", "ssim", "zscore", "dark_z", "feature")
#: maps that need :func:`fit_residual_norm`'s statistics of normal reconstructions
NORMALISED_MAPS = ("zscore", "dark_z")
NORM_BINS = 32  # x_hat intensity bins over [-1, 1] of the residual normaliser
#: the reconstruction methods' default map and smoothing (pixels), chosen on validation B-scans
#: (experiments/notes/2026-12-01-anomaly-maps-and-cross-device.md); map=residual,
#: map_sigma=0 is the papers' |x - x_hat|
DEFAULT_MAP = "dark_z"
DEFAULT_MAP_SIGMA = 8.0


def dark_residual_map(x: Tensor, x_hat: Tensor) -> Tensor:
    """max(x_hat - x, 0) averaged over channels: (B, 1, H, W); "darker than expected" (fluid)."""
    return (x_hat.float() - x.float()).clamp_min(0).mean(1, keepdim=True)


def _gaussian_blur(x: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Separable Gaussian (radius 3 sigma unless given, reflect padding) over H and W of
    (B, C, H, W)."""
    r = radius if radius is not None else round(3 * sigma)
    r = max(1, min(r, x.shape[-2] - 1, x.shape[-1] - 1))  # reflect padding: r < side
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(x: Tensor, x_hat: Tensor, sigma: float = 1.5, data_range: float = 2.0) -> Tensor:
    """1 - SSIM(x, x_hat) per pixel (Wang et al. 2004; Gaussian window of ``sigma``, constants
    K1 = 0.01, K2 = 0.03 of ``data_range``, 2 for [-1, 1]), averaged over channels: (B, 1, H, W),
    0 for identical images, up to 2."""
    x, y = x.float(), x_hat.float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    r = int(3.5 * sigma + 0.5)  # 11 taps at 1.5, Wang et al.'s window (skimage, torchmetrics)
    mu_x, mu_y = _gaussian_blur(x, sigma, r), _gaussian_blur(y, sigma, r)
    var_x = _gaussian_blur(x * x, sigma, r) - mu_x**2
    var_y = _gaussian_blur(y * y, sigma, r) - mu_y**2
    cov = _gaussian_blur(x * y, sigma, r) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return (1 - ssim).mean(1, keepdim=True)


def _bins(x_hat: Tensor, n_bins: int) -> Tensor:
    return ((x_hat.float().clamp(-1, 1) + 1) / 2 * n_bins).long().clamp_(max=n_bins - 1)


def residual_moments(x: Tensor, x_hat: Tensor, n_bins: int = NORM_BINS) -> Tensor:
    """Per-bin sums of the signed residual d = x_hat - x, binned by x_hat's intensity:
    (3, n_bins) float64 rows (count, sum d, sum d^2); add them over batches of normal images."""
    b = _bins(x_hat, n_bins).flatten()
    d = (x_hat.float() - x.float()).flatten().double()
    return torch.stack(
        [
            torch.bincount(b, minlength=n_bins).double(),
            torch.bincount(b, d, minlength=n_bins),
            torch.bincount(b, d * d, minlength=n_bins),
        ]
    )


def fit_residual_norm(moments: Tensor, min_count: int = 100) -> Tensor:
    """(2, n_bins) float32 (mean, std) of d = x_hat - x per x_hat intensity bin from
    :func:`residual_moments`; bins with fewer than ``min_count`` pixels take the overall ones."""
    n, s, ss = moments.double()
    if n.sum() < min_count:
        raise ValueError(f"residual normaliser: {int(n.sum())} pixels, need >= {min_count}")
    mean_all = s.sum() / n.sum()
    std_all = (ss.sum() / n.sum() - mean_all**2).clamp_min(1e-12).sqrt()
    mean = torch.where(n >= min_count, s / n.clamp_min(1), mean_all)
    std = torch.where(n >= min_count, (ss / n.clamp_min(1) - mean**2).clamp_min(0).sqrt(), std_all)
    return torch.stack([mean, std.clamp_min(1e-3 * float(std_all))]).float()


def normalised_residual_map(x: Tensor, x_hat: Tensor, norm: Tensor, signed: bool = False) -> Tensor:
    """(d - mean) / std of d = x_hat - x, with the (mean, std) of normal reconstructions at the
    pixel's expected intensity x_hat (``norm`` (2, n_bins) from :func:`fit_residual_norm`):
    absolute value, or ``signed``: clamped at 0 (darker than expected), averaged over channels."""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()  # export: checked before
    if not tracing and not torch.isfinite(norm).all():
        raise ValueError(
            "this map needs the residual normaliser fitted on training normals (fitted at the end "
            "of training; this model has none: retrain, or choose map=residual|dark|ssim|feature)"
        )
    norm = norm.to(x_hat.device)
    b = _bins(x_hat, norm.shape[1])
    z = (x_hat.float() - x.float() - norm[0][b]) / norm[1][b]
    z = z.clamp_min(0) if signed else z.abs()
    return z.mean(1, keepdim=True)


def feature_residual_map(f_x: Tensor, f_hat: Tensor, size: tuple[int, int]) -> Tensor:
    """Mean over channels of (f(x) - f(x_hat))^2, features (B, C, h, w) of one network layer,
    upsampled bilinearly to ``size``: (B, 1, *size)."""
    amap = (f_x.float() - f_hat.float()).pow(2).mean(1, keepdim=True)
    return F.interpolate(amap, size=size, mode="bilinear", align_corners=False)


def anomaly_map(
    kind: str,
    x: Tensor,
    x_hat: Tensor,
    norm: Tensor | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
    sigma: float = 0.0,
) -> Tensor:
    """The ``kind`` map of ``ANOMALY_MAPS`` of x and its reconstruction x_hat: (B, 1, H, W),
    higher = more anomalous, smoothed by a Gaussian of ``sigma`` pixels when > 0. ``norm``: the
    residual normaliser (zscore, dark_z); ``features``: x -> (B, C, h, w), a layer of the
    method's own network (feature)."""
    if kind == "residual":
        amap = residual_map(x.float(), x_hat.float())
    elif kind == "dark":
        amap = dark_residual_map(x, x_hat)
    elif kind == "ssim":
        amap = ssim_map(x, x_hat)
    elif kind in NORMALISED_MAPS:
        if norm is None:
            raise ValueError(f"map={kind} needs the residual normaliser")
        amap = normalised_residual_map(x, x_hat, norm, signed=kind == "dark_z")
    elif kind == "feature":
        if features is None:
            raise ValueError("map=feature: this method has no feature layer for the map")
        amap = feature_residual_map(features(x), features(x_hat), tuple(x.shape[-2:]))
    else:
        raise ValueError(f"map={kind!r}; expected one of {ANOMALY_MAPS}")
    return _gaussian_blur(amap, sigma) if sigma > 0 else amap
