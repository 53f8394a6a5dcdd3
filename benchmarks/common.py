"""Shared by the overhead benchmarks (not a benchmark itself: ``run.py`` skips it)."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from torch.utils.data import DataLoader


class _Timer(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = time.perf_counter() - self.t0, time.process_time() - self.c0


def lightning_loop(model: pl.LightningModule, data: list[dict]) -> tuple[float, float]:
    """One epoch over the in-memory ``data`` batches in a bare Trainer (no logger, checkpoint,
    progress bar or summary); (wall s, process CPU s) from training start to end."""
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    return timer.elapsed
