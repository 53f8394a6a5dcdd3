"""Batch-norm statistics of a DCGAN discriminator from real training normals at scoring time.

Used by :class:`~anogan_lightning.methods.anogan.AnoGAN` (and GAN_R) and
:class:`~anogan_lightning.methods.acae.ACAE`: training runs D on fakes twice as often as on real
images, so the running statistics that eval mode uses would mostly describe fakes; the reasons
and the choice are in :mod:`anogan_lightning.methods.anogan`'s docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext

import hydra
from torch import Tensor

from anogan_lightning.nets.dcgan import recalibrate_batch_norm

log = logging.getLogger(__name__)


class DiscriminatorCalibration:
    """Mixin for methods with a DCGAN ``self.discriminator``: its batch-norm statistics come
    from real training normals at scoring time (see the module docstring).

    Recalibrated at the end of training (from the fit's training loader), else at the start of
    validation or test when the checkpoint's discriminator was not (from the data module of the
    run, or one built from ``self.data_config``). Needs hyperparameters ``calibrate_d`` and
    ``calibration_batches``.
    """

    @staticmethod
    def check_calibration_batches(calibration_batches: int) -> None:
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")

    def calibrate_discriminator(self, loader) -> int:
        """Recalibrate on up to ``calibration_batches`` batches of ``loader`` (dicts with
        ``x``); returns the number of batches used and sets ``discriminator.calibrated``."""
        limit = self.hparams.calibration_batches

        def batches() -> Iterator[Tensor]:
            n = 0
            for batch in loader:
                if n >= limit:
                    return
                if batch is not None:
                    n += 1
                    yield batch["x"].to(self.device)

        trainer = self._trainer
        # the precision D ran in during training (autocast under mixed precision)
        context = trainer.precision_plugin.forward_context() if trainer else nullcontext()
        with context:
            n = recalibrate_batch_norm(self.discriminator, batches())
        self.discriminator.calibrated.fill_(True)
        log.info(
            "%s: discriminator batch norm recalibrated on %d batches of training normals",
            type(self).__name__,
            n,
        )
        return n

    def _training_loader(self):
        """The training normals' loader outside a fit: the trainer's data module, else one
        built from the data config the entry point recorded."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is None:
            if not self.data_config:
                raise RuntimeError(
                    f"{type(self).__name__}: calibrate_d needs the training normals to "
                    "recalibrate the discriminator, but there is no data module and no "
                    "data_config; pass one, or method.calibrate_d=false"
                )
            dm = hydra.utils.instantiate(self.data_config)
            dm.setup("fit")
        return dm.train_dataloader()

    def _calibrate_if_needed(self, loader=None) -> None:
        if not self.hparams.calibrate_d or bool(self.discriminator.calibrated):
            return
        self.calibrate_discriminator(loader if loader is not None else self._training_loader())

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.discriminator.calibrated.fill_(False)  # training moves the statistics again

    def on_train_end(self) -> None:
        super().on_train_end()
        self._calibrate_if_needed(self.trainer.train_dataloader)

    def on_validation_epoch_start(self) -> None:
        self._calibrate_if_needed()
        super().on_validation_epoch_start()

    def on_test_epoch_start(self) -> None:
        self._calibrate_if_needed()
        super().on_test_epoch_start()
