"""pix2pix baselines of the Sparse-GAN paper (Zhou et al., ISBI 2020, Table 1): #1 scores in image
space, #2 in latent space.

Generator G = G_de ∘ G_en (``nets.pix2pix.EncoderDecoder``), reconstructing I_re = G(I_in), and a
discriminator D judging I_in (real) against I_re (fake). Loss (eq. 1-3):

    L_G = lambda_re L_re + lambda_adv L_adv,   L_re = ||I_in - G(I_in)||_1  (mean per pixel)
    L_D = -log D(I_in) - log(1 - D(G(I_in)))

Scores, both reported in every run as components, so the #1 vs #2 ablation is one run:
- ``image`` (#1): mean over pixels of (I_in - I_re)^2;
- ``latent`` (#2, eq. 4): A(I) = ||H_in - H_re||^2 / (C h w), H_in = G_en(I_in), H_re = E(I_re),
  the encoder E being G_en itself (one parameter set, ``Pix2Pix.E``).
``score_space`` picks which of the two is ``score``. Pixel anomaly map: ``map`` of
:func:`anogan_lightning.scoring.anomaly_map` for #1 and #2 (the residual |I_in - I_re|:
``map=residual map_sigma=0``), or ``map=aam``: the Anomaly Activation Map (eq. 8,
:func:`anogan_lightning.scoring.anomaly_activation_map`; Sparse-GAN's, and #2's before the maps).

Choices the paper leaves open:
- Backbone: a DCGAN/pix2pix-style conv encoder-decoder without skips, depth from the image size,
  1024 x 7 x 7 latent at 224 x 224 with ``width=64`` (see ``nets/pix2pix.py``).
- Adversarial loss: the standard GAN loss with D a PatchGAN (one logit per latent-resolution
  patch, unconditional); G minimises the non-saturating form -log D(G(I_in))
  (``adv_loss="bce"``, the default). ``adv_loss="feature"`` replaces it by GANomaly's feature
  matching ||f(I_in) - f(G(I_in))||^2 on D's last hidden block, more stable but not the paper's.
- Optimisers: Adam lr 1e-3 (sec. 3.2) for G and D, betas (0.5, 0.999) as in pix2pix; one D and
  one G update per batch.
- What trains the latent score (#2): nothing directly. The paper's loss (eq. 3) has no
  latent-consistency term, so G_en(G(x)) ~ G_en(x) on normals holds only as far as a good
  reconstruction implies it; #1 and #2 are the same trained model scored two ways (the default,
  faithful). ``lambda_lat > 0`` (off by default, not the paper's) adds GANomaly's L_enc in a
  scale-free form, lambda_lat ||E(G(I_in)) - H_in||^2 / ||H_in||^2 (per sample): a plain
  ||.||^2 could be lowered by shrinking H_in, which the decoder's first BatchNorm makes free.
  In training H_re = E(G(I_in)) is computed without updating G_en's BatchNorm running
  statistics, so they stay those of real images.
- Logged every step: ``train/h_energy`` E[H_in^2], ``train/h_zeros`` (fraction of H_in exactly
  0) and ``train/h_between_var`` (variance of H_in across the batch, mean over features), so a
  collapse of the latent shows in the training curves.
- Scores are means over elements (a constant factor from the paper's sums: same ranking).
"""

from __future__ import annotations

from torch import Tensor, nn

from anogan_lightning.losses import bce_generator_loss
from anogan_lightning.methods.base import AnomalyModule
from anogan_lightning.nets.common import nhwc
from anogan_lightning.nets.pix2pix import EncoderDecoder, PatchDiscriminator
from anogan_lightning.scoring import (
    ANOMALY_MAPS,
    DEFAULT_MAP,
    DEFAULT_MAP_SIGMA,
    anomaly_activation_map,
    latent_stats,
    mean_sq,
)

ADV_LOSSES = ("bce", "feature")


class Pix2Pix(AnomalyModule):
    """Encoder-decoder GAN; ``score_space="image"`` is pix2pix #1, ``"latent"`` is #2."""

    components = ("image", "latent")

    def __init__(
        self,
        channels: int = 1,
        width: int = 64,
        image_size: int = 224,
        score_space: str = "latent",
        lambda_re: float = 20.0,
        lambda_adv: float = 1.0,
        adv_loss: str = "bce",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        lambda_lat: float = 0.0,
        map: str = DEFAULT_MAP,
        map_sigma: float = DEFAULT_MAP_SIGMA,
    ) -> None:
        super().__init__()
        if map not in (*ANOMALY_MAPS, "aam"):
            raise ValueError(f"map={map!r}; expected one of {(*ANOMALY_MAPS, 'aam')}")
        if score_space not in self.components:
            raise ValueError(f"score_space={score_space!r}; expected one of {self.components}")
        if adv_loss not in ADV_LOSSES:
            raise ValueError(f"adv_loss={adv_loss!r}; expected one of {ADV_LOSSES}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = EncoderDecoder(channels, width, image_size)
        self.discriminator = PatchDiscriminator(channels, width, image_size)

    @property
    def E(self) -> nn.Module:  # noqa: N802 (the paper's symbol)
        """The encoder E of H_re = E(G(I_in)): G_en itself, the same Parameter objects."""
        return self.generator.encoder

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    def configure_optimizers(self):
        return self.adam(self.discriminator.parameters()), self.adam(self.generator_parameters())

    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(I_re = G(x), H_in = G_en(x), auxiliary output for ``extra_generator_loss``)."""
        x_hat, h_in = self.generator(x)
        return x_hat, h_in, None

    def extra_generator_loss(
        self, h_in: Tensor, aux: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Terms added to L_G besides L_re and L_adv (Sparse-GAN's lambda_sp L_sp)."""
        return h_in.new_zeros(()), {}

    def encode_fake(self, x_hat: Tensor) -> Tensor:
        """H_re = E(x_hat) in training, leaving G_en's BatchNorm running statistics untouched."""
        norms = [m for m in self.E.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) running + 0 batch
        try:
            return self.E(x_hat)
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if batch is None:
            return
        hp = self.hparams
        x = batch["x"]
        opt_d, opt_g = self.optimizers()
        x_hat, h_in, aux = self.generate(
            x
        )  # before toggling: the G step back-propagates through it

        # D step: maximise log D(I_in) + log(1 - D(G(I_in)))  (eq. 2)
        logs = self.bce_discriminator_update(self.discriminator, opt_d, x, x_hat)

        # G step: lambda_re L_re + lambda_adv L_adv (+ lambda_sp L_sp for Sparse-GAN), eq. 3 / 7
        with self.toggled_optimizer(opt_g):
            loss_re = (x - x_hat).abs().mean()  # L1, eq. 1
            if hp.adv_loss == "bce":  # non-saturating: -log D(G(I_in))
                loss_adv = bce_generator_loss(self.discriminator(x_hat))
            else:  # feature matching (GANomaly): ||f(I_in) - f(G(I_in))||^2, f = D's last block
                f_real = self.discriminator.forward_with_features(x)[1]
                f_fake = self.discriminator.forward_with_features(x_hat)[1]
                loss_adv = (f_real - f_fake).pow(2).mean()
            extra, extra_logs = self.extra_generator_loss(h_in, aux)
            if hp.get("lambda_lat", 0.0) > 0:  # scale-free latent consistency (module docstring)
                h32 = h_in.float()
                energy = h32.pow(2).flatten(1).mean(1)  # (B,)
                loss_lat = (mean_sq(self.encode_fake(x_hat), h32) / (energy + 1e-6)).mean()
                extra = extra + hp.lambda_lat * loss_lat
                extra_logs["train/loss_lat"] = loss_lat
            loss_g = hp.lambda_re * loss_re + hp.lambda_adv * loss_adv + extra
            self.check_finite(
                **{"train/loss_re": loss_re, "train/loss_adv": loss_adv, **extra_logs}
            )
            self.optimizer_update(opt_g, loss_g, "train/loss_g")

        logs |= {"train/loss_g": loss_g, "train/loss_re": loss_re, "train/loss_adv": loss_adv}
        logs |= extra_logs | latent_stats(h_in.detach())
        self.log_dict({k: v.detach() for k, v in logs.items()}, prog_bar=True)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.generate(x)[0].float()

    def map_features(self, x: Tensor) -> Tensor:
        return self.generator.encoder.net[:2](nhwc(x))  # G_en's first stage, (B, width, S/2, S/2)

    def forward_scores(self, x: Tensor) -> dict[str, Tensor]:
        """x_hat = G(x), H_in = G_en(x), H_re = E(x_hat) and the image / latent scores."""
        x_hat, h_in, _ = self.generate(x)
        h_re = self.E(x_hat)
        return {
            "x_hat": x_hat,
            "h_in": h_in,
            "h_re": h_re,
            "image": mean_sq(x, x_hat),  # #1
            "latent": mean_sq(h_in, h_re),  # #2, eq. 4
        }

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        x = batch["x"]
        f = self.forward_scores(x)
        out = {name: f[name] for name in self.components}
        out["score"] = f[self.hparams.score_space]
        out["x_hat"] = f["x_hat"].float()
        if self.hparams.map == "aam":  # Sparse-GAN's AAM, eq. 8
            out["amap"] = anomaly_activation_map(f["h_in"], f["h_re"], x.shape[-2:])
        else:
            out["amap"] = self.anomaly_map(x, out["x_hat"])
        return out
