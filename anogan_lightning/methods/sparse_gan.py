"""Sparse-GAN (Zhou et al., "Sparse-GAN: Sparsity-constrained Generative Adversarial Network for
Anomaly Detection in Retinal OCT Image", ISBI 2020).

pix2pix #2 (``methods/pix2pix.py``) plus the Sparsity Regularization Net S on the latent feature
H_in = G_en(I_in) (1024 x 7 x 7 for a 224 x 224 input, sec. 2.4). Total generator loss (eq. 7):

    L_G = lambda_re L_re + lambda_adv L_adv + lambda_sp L_sp   (20, 1, 50 in sec. 3.2)
          [+ lambda_lat L_lat, not in the paper; on by default, see below]

with L_sp = S(H_in) the sparse-coding objective 1/2 ||H_in - W_d s||^2 + alpha ||s||_1 at the
code s that S computes (``nets/srn.py``). Score (eq. 4): A(I) = ||H_in - H_re||^2, H_re =
E(G(I_in)), E = G_en (one parameter set). Decision (eq. 5): C(I) = 1 if A(I) >= phi, phi chosen on
the validation set (the base class stores the validation Youden cut-off and reports accuracy and
sensitivity on test at it). Pixel anomaly map: ``map=aam`` is the paper's Anomaly Activation
Map (sec. 2.4, eq. 8): w = |GAP(H_in) - GAP(H_re)| per channel, map = sum_c w_c H_in[c],
upsampled to the image. The default is the reconstruction methods' map (``map`` of
:func:`anogan_lightning.scoring.anomaly_map`, dark_z smoothed by ``map_sigma``), because on real
fluid annotations the AAM ranks fluid pixels below the rest (issue 12;
experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md);
checkpoints saved before this choice keep the AAM.
Components: ``image`` (#1's score), ``latent`` (the paper's score) and ``code``, not in the
paper: ||s(H_in) - s(H_re)||^2, the distance of the SRN's sparse codes of the two latents (in
the normalised space of ``"scaled"`` / ``"split"``), the only score that reads the SRN at test
time (``score_space`` picks the headline among the three;
experiments/notes/2026-12-03-sparse-gan-readings-on-retina-windows.md has what each gave).

Readings of L_sp (``sparsity_mode``; the paper gives eq. 6-7 but not what the scale of H_in is):
- ``"paper"`` (paper-literal): L_sp = S(H_in) on the raw latent, back-propagating into G_en, the
  SRN and W_d alike. The objective is scale-dependent (both 1/2 ||H - W_d s||^2 and alpha ||s||_1
  shrink with H), and shrinking H_in costs the reconstruction nothing: the last encoder stage is
  BatchNorm without affine + ReLU, which fixes the variance of the pre-activation per channel
  but not the energy after the ReLU (a skewed pre-activation, a few large negative values and
  many small positive ones, has little energy left), and the decoder's first transposed
  convolution is followed by BatchNorm, which undoes any scale. So G_en meets L_sp by shrinking
  H_in, and ||H_in - H_re||^2 ends up comparing a latent whose scale (``train/h_energy``) and
  between-image variance (``train/h_between_var``) collapse during training.
- ``"scaled"``: L_sp = S(H_in / rms(H_in)), rms per sample over (C, h, w), gradient through the
  norm too, so L_sp(c H) = L_sp(H) for every c > 0: it can be lowered only by making H codable
  by few atoms, not by shrinking it.
- ``"split"``: the SRN and W_d are trained on their own objective L_scl at sg(H_in / rms) (eq. 6:
  the SRN learns to solve the coding problem, nothing of it reaches G_en), and G_en receives
  only the scale-free pull 1/2 ||H_in / rms - sg(W_d s)||^2 / (C h w) towards its sparse
  approximation. With ``decode_from="code"`` there is no pull: the decoder reads W_d S(H_in /
  rms) of the live H_in (so L_re and L_adv train G_en, the SRN and W_d through the code), L_scl
  trains the SRN on sg(H_in / rms), and H_in itself is left unconstrained (a sparse bottleneck
  between an unconstrained encoder and the decoder: what normal atoms cannot code sparsely is
  not reconstructed, and H_re = E(I_re) then differs from H_in).
Latent consistency (``lambda_lat``, from ``methods/pix2pix.py``; 0 in the paper): the
scale-free lambda_lat ||E(G(I_in)) - H_in||^2 / ||H_in||^2, the only term that trains the latent
score itself (G_en(G(x)) ~ G_en(x) on normals); eq. 3 and 7 have none.
Defaults: ``sparsity_mode="split"``, ``lambda_sp=5``, ``lambda_lat=1``, ``decode_from="code"``,
chosen on validation AUROC by the ablations over these keys (``conf/sweep/sparse_gan_modes``;
the last one on retina-normalised windows, 3 seeds each, where the sparse bottleneck led every
other reading on validation:
experiments/notes/2026-12-03-sparse-gan-readings-on-retina-windows.md). The paper-literal
reading is ``sparsity_mode="paper"``, ``lambda_sp=50``, ``lambda_lat=0``, ``decode_from="latent"``.

Choices the paper leaves open, made here (each also in the module it concerns):
- Backbone (``nets/pix2pix.py``): conv encoder-decoder without skips, 5 stride-2 stages at 224
  (64-128-256-512-1024 channels at ``width=64``) giving H_in 1024 x 7 x 7; the last encoder stage
  is BatchNorm without affine parameters + ReLU, so H_in >= 0 (CAM-like features for the AAM);
  its scale is not fixed (see ``"paper"`` above).
- Where the SRN sits (the paper's text admits both): the decoder reconstructs from the sparse
  approximation W_d s of the (for ``"scaled"`` / ``"split"``: normalised) H_in
  (``decode_from="code"``, the default: a sparse bottleneck, as in memory-augmented
  auto-encoders, so a query the normal atoms cannot code sparsely is reconstructed badly and
  its H_re = E(I_re) moves away from H_in), or the SRN is a regulariser and the decoder reads
  H_in itself (``decode_from="latent"``, the reading of ``+experiment=isbi2020_sparse_gan``):
  L_sp pulls G_en's features towards what a dictionary learnt on normal retinas codes
  sparsely, the constraint the latent score then measures departures from.
- SRN (``nets/srn.py``): T = ``srn_steps`` unrolled Sparse-LSTM steps (default 3) with k x k
  convolutions (``srn_kernel``, default 3) for the input and state products, gates and cell as
  in an LSTM, a learnable per-channel soft-threshold theta = exp(log_theta) > 0 as output
  non-linearity; initialised as ISTA for its dictionary. Dictionary W_d (C, K) per position with
  unit-norm atoms, K = ``srn_code_channels`` (default C = 1024 at the paper's size).
- L_sp is a mean per feature element (sum / (C h w)), batch-averaged; the sparsity weight of
  eq. 6 is ``alpha`` (0.2: see ``nets/srn.py`` and the tests for the sparsity it gives).
- W_d, the SRN and G are updated by the same Adam optimiser (lr 1e-3) on L_G; D as in pix2pix.
- Adversarial loss, optimisers: as ``methods/pix2pix.py``.
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.methods.pix2pix import Pix2Pix
from anogan_lightning.nets.srn import SparsityRegularizationNet
from anogan_lightning.scoring import DEFAULT_MAP, DEFAULT_MAP_SIGMA, mean_sq

DECODE_FROM = ("latent", "code")  # what G_de reads: H_in, or its sparse approximation W_d s
# what L_sp acts on and what it trains (module docstring): "paper" S(H_in) on the raw latent;
# "scaled" S(H_in / rms(H_in)); "split" the SRN on S(sg(H_in / rms)), G_en on the residual
SPARSITY_MODES = ("paper", "scaled", "split")


def scale_normalise(h: Tensor, eps: float = 1e-10) -> Tensor:
    """H / sqrt(mean(H^2)) per sample (B, C, h, w): invariant to H -> c H for every c > 0."""
    rms = h.pow(2).flatten(1).mean(1).add(eps).sqrt()
    return h / rms.view(-1, *([1] * (h.dim() - 1)))


class SparseGAN(Pix2Pix):
    """pix2pix #2 + Sparsity Regularization Net; latent score, AAM anomaly map."""

    components = ("image", "latent", "code")

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        score_space: str = "latent",
        lambda_re: float = 20.0,
        lambda_adv: float = 1.0,
        lambda_sp: float = 5.0,
        adv_loss: str = "bce",
        alpha: float = 0.2,
        srn_steps: int = 3,
        srn_kernel: int = 3,
        srn_code_channels: int | None = None,
        decode_from: str = "code",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        lambda_lat: float = 1.0,
        sparsity_mode: str = "split",
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
    ) -> None:
        super().__init__(
            channels,
            width,
            image_size,
            score_space,
            lambda_re,
            lambda_adv,
            adv_loss,
            lr,
            betas,
            lambda_lat,
            map=map,  # "aam": the paper's Anomaly Activation Map, eq. 8
            map_sigma=map_sigma,
        )
        if decode_from not in DECODE_FROM:
            raise ValueError(f"decode_from={decode_from!r}; expected one of {DECODE_FROM}")
        if sparsity_mode not in SPARSITY_MODES:
            raise ValueError(f"sparsity_mode={sparsity_mode!r}; expected one of {SPARSITY_MODES}")
        self.save_hyperparameters()
        self.srn = SparsityRegularizationNet(
            self.generator.encoder.out_channels, srn_code_channels, srn_steps, srn_kernel, alpha
        )

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.srn.parameters())

    def sparse_input(self, h_in: Tensor) -> Tensor:
        """What S codes: H_in ("paper") or H_in / rms(H_in) per sample ("scaled", "split")."""
        h = h_in.float()
        return h if self.hparams.sparsity_mode == "paper" else scale_normalise(h)

    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``decode_from="code"``: I_re = G_de(W_d S(H)), the code s returned for L_sp."""
        if self.hparams.decode_from == "latent":
            return super().generate(x)
        h_in = self.generator.encoder(x)
        code = self.srn(self.sparse_input(h_in))
        x_hat = self.generator.decoder(self.srn.reconstruct(code).to(h_in.dtype))
        return x_hat, h_in, code

    def sparsity_loss(self, h_in: Tensor, code: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_sp (scalar) for the G step, the code s) in this run's ``sparsity_mode``."""
        h = self.sparse_input(h_in)
        if self.hparams.sparsity_mode != "split":
            if code is None:
                code = self.srn(h)
            return self.srn.objective(h, code).mean(), code  # L_sp = S(H), eq. 6-7
        # "split": S and W_d learn the coding of sg(H) (L_scl, eq. 6); G_en only moves H towards
        # its sparse approximation sg(W_d s), a scale-free signal (H is normalised)
        code_det = self.srn(h.detach())
        loss_scl = self.srn.objective(h.detach(), code_det)
        if self.hparams.decode_from == "code":
            # the decoder reads W_d S(H) of the live H (``generate``): G_en learns only through
            # that reading (L_re, L_adv), no pull towards the code, so H_in keeps what the
            # normal atoms cannot code and I_re does not
            return loss_scl.mean(), code if code is not None else code_det
        code = code_det
        target = self.srn.reconstruct(code).detach()
        loss_g = 0.5 * (h - target).pow(2).flatten(1).sum(1) / h[0].numel()
        return (loss_scl + loss_g).mean(), code

    def forward_scores(self, x: Tensor) -> dict[str, Tensor]:
        """#2's scores, and ``code``: ||s(H_in) - s(H_re)||^2 / K h w, the distance of the SRN's
        sparse codes of the (for ``"scaled"`` / ``"split"``: normalised) latents."""
        f = super().forward_scores(x)
        s_in = self.srn(self.sparse_input(f["h_in"]))
        s_re = self.srn(self.sparse_input(f["h_re"]))
        f["code"] = mean_sq(s_in, s_re)
        return f

    def extra_generator_loss(
        self, h_in: Tensor, aux: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss_sp, code = self.sparsity_loss(h_in, aux)  # aux: the code the decoder read
        logs = {
            "train/loss_sp": loss_sp,
            "train/code_zeros": (code == 0).float().mean().detach(),  # fraction exactly zero
        }
        return self.hparams.lambda_sp * loss_sp, logs
