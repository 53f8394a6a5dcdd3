"""AnomalyModule: the base of every method. Methods implement ``training_step`` and ``score``;
the val/test hooks hand the scores to :class:`~anogan_lightning.evaluation.collector.Collector`.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from anogan_lightning import scoring
from anogan_lightning.evaluation.collector import Collector, eval_dataset
from anogan_lightning.losses import bce_discriminator_loss

MAP_NORM_BATCHES = 32  # training batches of normals the residual normaliser is fitted on
#: the layout of ``checkpoint["anogan_lightning"]`` and of the state a method saves; a
#: checkpoint without it (anogan-lightning 0.1) is refused on load
CHECKPOINT_FORMAT = 2


class DivergenceError(FloatingPointError):
    """A training loss became NaN or infinite."""


class AnomalyModule(pl.LightningModule):
    """Base of every method.

    Subclasses implement ``score(batch, batch_idx) -> dict`` returning at least ``score`` (B,),
    raw, higher = more anomalous; optionally more (B,) score components (each gets its own AUROC and a
    ``scores.csv`` column), ``x_hat`` (B, C, H, W) and ``amap`` (B, 1, H, W).

    The val/test steps hand every ``score()`` output to a
    :class:`~anogan_lightning.evaluation.collector.Collector`. At the end of validation the
    Youden cut-off of the val ROC is stored in the ``threshold`` buffer (so it lives in the
    checkpoint); test reports metrics at that threshold too. ``records[split]`` keeps per-image
    ids, labels, class names, scores and a few sample images for the run's artefacts;
    ``results[split]`` the flat metrics with the split's ``status``
    (:mod:`~anogan_lightning.evaluation.collector`).
    """

    #: methods whose scoring back-propagates at test time (latent search) set this
    needs_grad_at_test: bool = False
    #: image-level score components beside ``score``, in display order
    components: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        if self.reconstruct is not None:
            # (mean, std) of x_hat - x on training normals per x_hat intensity bin, for the
            # normalised anomaly maps (scoring.NORMALISED_MAPS); NaN until fitted
            self.register_buffer("map_norm", torch.full((2, scoring.NORM_BINS), math.nan))
        self.records: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        self.collector: Collector | None = None  # the split being evaluated
        #: the data config the model was trained with (set by the entry point), so that
        #: ``anogan_lightning.predict`` preprocesses new scans the same way
        self.data_config: dict = {}
        #: the training run's provenance (``anogan_lightning.provenance``; set by the entry
        #: point), kept in the checkpoint so that predictions trace back to it
        self.provenance: dict = {}
        #: the B-scan preprocessing record (``BScanPreprocessing.to_dict()``; set by the entry
        #: point for B-scan data), so predict and export rebuild the very same preprocessing
        self.preprocessing: dict = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["anogan_lightning"] = {
            "format": CHECKPOINT_FORMAT,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "data": self.data_config,
            "provenance": self.provenance,
        }
        if self.preprocessing:  # B-scan models: data.bscan.preprocessing_from_checkpoint
            checkpoint["anogan_lightning"]["preprocessing"] = self.preprocessing

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("anogan_lightning") or {}
        check_format(stored)
        self.data_config = stored.get("data", {})
        self.provenance = stored.get("provenance", {})
        self.preprocessing = stored.get("preprocessing", {})

    # -- training: per-epoch seeding, so a resumed run matches an uninterrupted one ------------
    def on_fit_start(self) -> None:
        self._run_seed = torch.initial_seed()  # seed_everything's value, before any reseeding

    def on_train_epoch_start(self) -> None:
        # noise drawn in training steps (z, random crops) comes from the global RNG, whose state
        # a checkpoint does not hold: reseed it from (run seed, epoch) at every epoch start
        seed = getattr(self, "_run_seed", torch.initial_seed()) * 100_003 + self.current_epoch
        pl.seed_everything(seed % 2**32, workers=True, verbose=False)

    # -- subclasses ---------------------------------------------------------------------------
    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_complete(self) -> bool:
        """Whether the fit reached a state whose scores mean something (default: always).

        A method whose training can stop before it is usable (a time budget that ends a
        multi-stage fit before its last stage) returns False, and says why in
        :meth:`incomplete_reason`; the entry point then reports the run as incomplete, with no
        AUROC, instead of scoring it.
        """
        return True

    def incomplete_reason(self) -> str:
        """Why :meth:`training_complete` is False (one line, for results.json and the report)."""
        return f"{type(self).__name__}: training did not complete"

    #: reconstruction methods: x (B, C, H, W) -> x_hat, for the residual normaliser
    reconstruct = None
    #: methods with ``map=feature``: x -> (B, C, h, w), a layer of their own network
    map_features = None

    # -- anomaly maps of reconstruction methods (hparams ``map``, ``map_sigma``) ----------------
    def anomaly_map(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """The ``map`` hyperparameter's map of x and x_hat (:func:`scoring.anomaly_map`)."""
        hp = self.hparams
        return scoring.anomaly_map(
            hp.get("map", "residual"),
            x.float(),
            x_hat.float(),
            self.map_norm,
            self.map_features,
            hp.get("map_sigma", 0.0),
        )

    @torch.no_grad()
    def fit_map_norm(self, loader, max_batches: int = MAP_NORM_BATCHES) -> None:
        """Fit ``map_norm`` on the reconstructions of (up to ``max_batches``) batches of normal
        images of ``loader``; eval mode, the training mode restored after."""
        was_training = self.training
        self.eval()
        moments = torch.zeros(3, scoring.NORM_BINS, dtype=torch.float64)
        for k, batch in enumerate(loader):
            if k >= max_batches:
                break
            if batch is None:
                continue
            x = batch["x"].to(self.device)
            moments += scoring.residual_moments(x, self.reconstruct(x)).cpu()
        if dist.is_available() and dist.is_initialized():
            moments = moments.to(self.device)
            dist.all_reduce(moments)
        self.map_norm.copy_(scoring.fit_residual_norm(moments.cpu()))
        self.train(was_training)

    def on_train_end(self) -> None:
        loader = getattr(self.trainer, "train_dataloader", None)
        if self.reconstruct is not None and loader is not None:
            self.fit_map_norm(loader)

    # -- helpers ------------------------------------------------------------------------------
    def check_finite(self, **losses: Tensor) -> None:
        """Stop training with one message naming the step and the loss term that diverged."""
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                raise DivergenceError(
                    f"training diverged at global step {self.global_step} "
                    f"(epoch {self.current_epoch}): {name} = {value.item()}"
                )

    def adam(self, params) -> torch.optim.Adam:
        """Adam over ``params`` with the method's ``lr`` and ``betas`` hyperparameters."""
        return torch.optim.Adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def optimizer_update(self, opt, loss: Tensor, name: str | None = None) -> None:
        """One manual-optimisation update of ``opt`` on ``loss`` (zero grad, backward, step);
        with ``name``, a non-finite ``loss`` first stops training naming it (:meth:`check_finite`)."""
        if name is not None:
            self.check_finite(**{name: loss})
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()

    def bce_discriminator_update(
        self, discriminator: nn.Module, opt, x: Tensor, x_fake: Tensor, real_label: float = 1.0
    ) -> dict[str, Tensor]:
        """The D step of a BCE GAN: one update of ``discriminator`` on
        -log D(x) - log(1 - D(x_fake)) (:func:`~anogan_lightning.losses.bce_discriminator_loss`);
        ``x_fake`` is detached, so no gradient reaches the network that made it.

        Returns the logs ``train/loss_d``, ``train/d_real`` and ``train/d_fake`` (mean D output).
        """
        with self.toggled_optimizer(opt):
            logit_real = discriminator(x)
            logit_fake = discriminator(x_fake.detach())
            loss_d = bce_discriminator_loss(logit_real, logit_fake, real_label)
            self.optimizer_update(opt, loss_d, "train/loss_d")
        return {
            "train/loss_d": loss_d.detach(),
            "train/d_real": torch.sigmoid(logit_real).mean().detach(),
            "train/d_fake": torch.sigmoid(logit_fake).mean().detach(),
        }

    def _check_grad_mode(self) -> None:
        if self.needs_grad_at_test and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} back-propagates at test time (latent search): build the "
                "Trainer with inference_mode=False (its conf/method yaml sets "
                "trainer.inference_mode: false; do not override it)"
            )

    # -- evaluation: the collector gathers, stitches, aggregates and scores each split ---------
    def _start(self, split: str) -> None:
        self._check_grad_mode()
        self.collector = Collector(self.components)  # read now: a method may set it per instance
        self.collector.start(split, eval_dataset(self._trainer, split))

    def _collect(self, batch: dict | None, batch_idx: int) -> None:
        if batch is not None:  # None: every image of the batch unreadable (collate_skip_none)
            self.collector.collect(batch, self.score(batch, batch_idx))

    def _finish(self, split: str) -> dict:
        val_threshold = float(self.threshold) if split == "test" else None
        done = self.collector.finish(val_threshold)
        if done.threshold is not None:
            self.threshold.fill_(done.threshold)
        self.records[split], self.results[split] = done.record, done.metrics
        numbers = {k: float(v) for k, v in done.metrics.items() if not isinstance(v, str)}
        if numbers and self._trainer is not None:
            self.log_dict(numbers, sync_dist=False)
        return done.metrics

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._finish("test")


def check_format(stored: dict) -> None:
    """Refuse a checkpoint whose ``anogan_lightning`` record is not of :data:`CHECKPOINT_FORMAT`."""
    found = stored.get("format")
    if found != CHECKPOINT_FORMAT:
        writer = "anogan-lightning 0.1" if found is None else f"checkpoint format {found}"
        raise ValueError(
            f"this checkpoint was written by {writer}; this version reads checkpoint format "
            f"{CHECKPOINT_FORMAT} only: retrain the model (python -m anogan_lightning.train)"
        )
