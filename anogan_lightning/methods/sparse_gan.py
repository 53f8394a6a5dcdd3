"""Sparse-GAN (Zhou et al., "Sparse-GAN: Sparsity-constrained Generative Adversarial Network for
Anomaly Detection in Retinal OCT Image", ISBI 2020).

pix2pix #2 (``methods/pix2pix.py``) plus the Sparsity Regularization Net S on the latent feature
H_in = G_en(I_in) (1024 x 7 x 7 for a 224 x 224 input, sec. 2.4). Total generator loss (eq. 7):

    L_G = lambda_re L_re + lambda_adv L_adv + lambda_sp L_sp,   (20, 1, 50 in sec. 3.2)

with L_sp = S(H_in) the sparse-coding objective 1/2 ||H_in - W_d s||^2 + alpha ||s||_1 at the
code s that S computes (``nets/srn.py``). Score (eq. 4): A(I) = ||H_in - H_re||^2, H_re =
E(G(I_in)), E = G_en (one parameter set). Decision (eq. 5): C(I) = 1 if A(I) >= phi, phi chosen on
the validation set (the base class stores the validation Youden cut-off and reports accuracy and
sensitivity on test at it). Pixel anomaly map: the Anomaly Activation Map (sec. 2.4, eq. 8):
w = |GAP(H_in) - GAP(H_re)| per channel, map = sum_c w_c H_in[c], upsampled to the image.
Components: ``image`` (#1's score) and ``latent`` (= ``score``). The SRN does not run at test
time: the paper's score does not use it, and the query's own L_sp, tried as a component, ranked
below chance on kermany-mini while adding a large share of the scoring FLOPs (figures in
experiments/README.md).

Choices the paper leaves open, made here (each also in the module it concerns):
- Backbone (``nets/pix2pix.py``): conv encoder-decoder without skips, 5 stride-2 stages at 224
  (64-128-256-512-1024 channels at ``width=64``) giving H_in 1024 x 7 x 7; the last encoder stage
  is BatchNorm without affine parameters + ReLU, so H_in >= 0 (CAM-like features for the AAM)
  with a fixed per-channel scale (L_sp cannot be lowered by shrinking H_in).
- The SRN is a regulariser: the decoder reads H_in itself, not the sparse code
  (``decode_from="latent"``, the default); L_sp pulls G_en's features towards what a dictionary
  learnt on normal retinas codes sparsely, which is the constraint the latent score then
  measures departures from. The paper's text also admits the other reading, the decoder
  reconstructing from the sparse approximation W_d s of H_in (``decode_from="code"``: a sparse
  bottleneck, as in memory-augmented auto-encoders, so a query the normal atoms cannot code
  sparsely is reconstructed badly); both are here, compared in experiments/README.md.
- SRN (``nets/srn.py``): T = ``srn_steps`` unrolled Sparse-LSTM steps (default 3) with k x k
  convolutions (``srn_kernel``, default 3) for the input and state products, gates and cell as
  in an LSTM, a learnable per-channel soft-threshold theta = exp(log_theta) > 0 as output
  non-linearity; initialised as ISTA for its dictionary. Dictionary W_d (C, K) per position with
  unit-norm atoms, K = ``srn_code_channels`` (default C = 1024 at the paper's size).
- L_sp is a mean per feature element (sum / (C h w)), batch-averaged; the sparsity weight of
  eq. 6 is ``alpha`` (0.2: see ``nets/srn.py`` and the tests for the sparsity it gives).
- W_d, the SRN and G are updated by the same Adam optimiser (lr 1e-3) on L_G; D as in pix2pix.
- Adversarial loss, optimisers, no latent-consistency loss: as ``methods/pix2pix.py``.
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.methods.pix2pix import Pix2Pix
from anogan_lightning.nets.srn import SparsityRegularizationNet

DECODE_FROM = ("latent", "code")  # what G_de reads: H_in, or its sparse approximation W_d s


class SparseGAN(Pix2Pix):
    """pix2pix #2 + Sparsity Regularization Net; latent score, AAM anomaly map."""

    components = ("image", "latent")

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        score_space: str = "latent",
        lambda_re: float = 20.0,
        lambda_adv: float = 1.0,
        lambda_sp: float = 50.0,
        adv_loss: str = "bce",
        alpha: float = 0.2,
        srn_steps: int = 3,
        srn_kernel: int = 3,
        srn_code_channels: int | None = None,
        decode_from: str = "latent",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
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
            map="aam",  # the AAM, eq. 8
        )
        if decode_from not in DECODE_FROM:
            raise ValueError(f"decode_from={decode_from!r}; expected one of {DECODE_FROM}")
        self.save_hyperparameters()
        self.srn = SparsityRegularizationNet(
            self.generator.encoder.out_channels, srn_code_channels, srn_steps, srn_kernel, alpha
        )

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.srn.parameters())

    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``decode_from="code"``: I_re = G_de(W_d S(H_in)), the code s returned for L_sp."""
        if self.hparams.decode_from == "latent":
            return super().generate(x)
        h_in = self.generator.encoder(x)
        code = self.srn(h_in.float())
        x_hat = self.generator.decoder(self.srn.reconstruct(code).to(h_in.dtype))
        return x_hat, h_in, code

    def extra_generator_loss(
        self, h_in: Tensor, aux: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if aux is None:
            loss_sp, code = self.srn.loss(h_in.float())
        else:  # the code the decoder read (decode_from="code")
            code = aux
            loss_sp = self.srn.objective(h_in.float(), code)
        loss_sp = loss_sp.mean()  # L_sp = S(H_in), eq. 7
        logs = {
            "train/loss_sp": loss_sp,
            "train/code_zeros": (code == 0).float().mean().detach(),  # fraction exactly zero
        }
        return self.hparams.lambda_sp * loss_sp, logs
