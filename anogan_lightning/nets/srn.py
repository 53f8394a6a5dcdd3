"""Sparsity Regularization Net S (Sparse-GAN, Zhou et al., ISBI 2020, sec. 2.3).

S approximately solves, at every position p of a latent feature map H (B, C, h, w), the sparse
coding problem

    min_s  1/2 ||H_p - W_d s_p||^2 + alpha ||s_p||_1                                   (eq. 6)

with a dictionary W_d of K atoms (C, K), by an unrolled recurrent net in the manner of the Sparse
LSTM of SC2Net (Zhou et al., AAAI 2018): LSTM gates and cell, a learnable soft-threshold in place
of the LSTM's output non-linearity, and convolutions in place of the matrix products (as in a
ConvLSTM), so each step sees a k x k neighbourhood of codes. One step t = 1..T:

    [c~, i, f]_t = W * H + U * s_{t-1}                      (* = convolution, k x k)
    c_t = sigmoid(f_t) ⊙ c_{t-1} + sigmoid(i_t) ⊙ c~_t
    s_t = h_theta(c_t),   h_theta(c) = sign(c) max(|c| - theta, 0)   (theta > 0, per code channel)

from c_0 = s_0 = 0; the code is s_T. With the gates fully open (i = 1, f = 0) a step is exactly an
ISTA step s_t = h_{alpha/L}(W_d^T H / L + (I - W_d^T W_d / L) s_{t-1}), L = ||W_d||_2^2, and the
net is initialised there (centre taps of W and U from W_d, other taps and gate weights 0, gate
biases +-3, theta = alpha / L): before training, more steps already mean a better solution, and
training (LISTA-style, the weights free) makes few steps reach what ISTA needs many for.

Choices the paper leaves open, made here:
- Dictionary: W_d (C, K), applied per position (a 1x1 convolution), K = ``code_channels``
  (default C: a complete dictionary; 1024 atoms at the paper's 1024 x 7 x 7). Atoms are kept at
  unit norm (W_d = V / ||V||_col), the usual constraint without which ||s||_1 could be made
  arbitrarily small by growing W_d.
- Steps T = ``steps`` (default 3) and kernel k = ``kernel_size`` (default 3).
- L_sp = S(H_in): the objective (eq. 6) at the code s_T, summed over positions and divided by
  C * h * w (a mean per feature element), averaged over the batch. W_d, the SRN and G_en all
  minimise it: the SRN learns to solve the problem, W_d learns atoms for normal retinas, and
  G_en learns features that such a dictionary codes sparsely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_BIAS = 3.0  # sigmoid(3) = 0.95: gates start nearly open (input) / closed (forget): ~ISTA


def soft_threshold(c: Tensor, theta: Tensor) -> Tensor:
    """h_theta(c) = sign(c) max(|c| - theta, 0): exact zeros below the threshold."""
    return torch.sign(c) * F.relu(c.abs() - theta)


class SparsityRegularizationNet(nn.Module):
    """S: H (B, C, h, w) -> sparse code s_T (B, K, h, w); ``loss`` gives L_sp per sample."""

    def __init__(
        self,
        in_channels: int,
        code_channels: int | None = None,
        steps: int = 3,
        kernel_size: int = 3,
        alpha: float = 0.1,
    ) -> None:
        super().__init__()
        if steps < 1 or kernel_size % 2 == 0:
            raise ValueError(f"steps must be >= 1 and kernel_size odd, got {steps}, {kernel_size}")
        c, k = in_channels, code_channels or in_channels
        self.in_channels, self.code_channels = c, k
        self.steps, self.alpha = steps, alpha
        self.dictionary = nn.Parameter(torch.randn(c, k) / math.sqrt(c))  # V; W_d = V / ||V||_col
        self.input_conv = nn.Conv2d(c, 3 * k, kernel_size, padding=kernel_size // 2)  # W * H
        self.state_conv = nn.Conv2d(k, 3 * k, kernel_size, padding=kernel_size // 2, bias=False)
        self.log_theta = nn.Parameter(torch.zeros(k))
        self.init_ista()

    def atoms(self) -> Tensor:
        """W_d (C, K) with unit-norm columns."""
        return self.dictionary / self.dictionary.norm(dim=0, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def init_ista(self, dictionary: Tensor | None = None) -> None:
        """Set (optionally) the dictionary and put every step at an ISTA step for it."""
        if dictionary is not None:
            self.dictionary.copy_(dictionary)
        w_d = self.atoms()  # (C, K)
        lipschitz = float(torch.linalg.matrix_norm(w_d, ord=2)) ** 2  # L = ||W_d||_2^2
        k, centre = self.code_channels, self.input_conv.kernel_size[0] // 2
        for conv in (self.input_conv, self.state_conv):
            conv.weight.zero_()
        self.input_conv.weight[:k, :, centre, centre] = w_d.T / lipschitz  # W_e = W_d^T / L
        eye = torch.eye(k, device=w_d.device, dtype=w_d.dtype)
        self.state_conv.weight[:k, :, centre, centre] = eye - w_d.T @ w_d / lipschitz  # S
        bias = self.input_conv.bias
        bias.zero_()
        bias[k : 2 * k] = GATE_BIAS  # input gate open
        bias[2 * k :] = -GATE_BIAS  # forget gate closed
        self.log_theta.fill_(math.log(self.alpha / lipschitz))

    @property
    def theta(self) -> Tensor:
        return self.log_theta.exp()

    def forward(self, h: Tensor, steps: int | None = None) -> Tensor:
        """Code s_T (B, K, h, w) of H (B, C, h, w); ``steps`` overrides T (e.g. to unroll more)."""
        k = self.code_channels
        theta = self.theta.view(1, k, 1, 1)
        x_gates = self.input_conv(h)  # W * H (B, 3K, h, w), once for all steps
        c = torch.zeros_like(x_gates[:, :k])  # c_0 = 0
        s = None  # s_0 = 0, so U * s_0 = 0
        for _ in range(steps or self.steps):
            gates = x_gates if s is None else x_gates + self.state_conv(s)
            cand, gate_in, gate_forget = gates.split(k, dim=1)
            c = torch.sigmoid(gate_forget) * c + torch.sigmoid(gate_in) * cand
            s = soft_threshold(c, theta)
        return s

    def reconstruct(self, s: Tensor) -> Tensor:
        """W_d s: (B, K, h, w) -> (B, C, h, w)."""
        return torch.einsum("ck,bkhw->bchw", self.atoms(), s)

    def objective(self, h: Tensor, s: Tensor) -> Tensor:
        """Per-sample L_sp (B,): [1/2 ||H - W_d s||^2 + alpha ||s||_1] / (C h w)  (eq. 6)."""
        n = h[0].numel()
        residual = (h - self.reconstruct(s)).pow(2).flatten(1).sum(1)
        return (0.5 * residual + self.alpha * s.abs().flatten(1).sum(1)) / n

    def loss(self, h: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """(per-sample L_sp = S(H) (B,), code s_T (B, K, h, w))."""
        s = self.forward(h, steps)
        return self.objective(h, s), s
