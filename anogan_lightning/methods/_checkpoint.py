"""Loading a method's networks from another run's Lightning checkpoint (GAN_R's
``from_checkpoint``, f-AnoGAN's ``gan_checkpoint``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch


def load_networks(
    model: pl.LightningModule,
    path: str | Path,
    names: Sequence[str],
    arch_keys: Sequence[str],
    knob: str,
) -> None:
    """Copy the sub-modules ``names`` (e.g. ``("generator", "discriminator")``) of ``model``
    from the Lightning checkpoint at ``path``.

    The hyperparameters ``arch_keys`` (the architecture arguments) must equal the checkpoint's;
    a missing file, a mismatch or a checkpoint without one of the networks is an error naming
    ``knob`` (the config key that gave ``path``), the file and the problem.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{knob}: checkpoint {path} does not exist")
    # a Lightning checkpoint the user names (the trust of load_from_checkpoint): full unpickling
    ckpt = torch.load(path, map_location=model.device, weights_only=False)
    theirs = ckpt.get("hyper_parameters", {})
    diff = [k for k in arch_keys if k in theirs and theirs[k] != model.hparams[k]]
    if diff:
        detail = ", ".join(
            f"{k}: checkpoint {theirs[k]} vs config {model.hparams[k]}" for k in diff
        )
        raise ValueError(f"{knob}: {path} has another architecture ({detail})")
    for name in names:
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{knob}: {path} holds no {name} weights")
        getattr(model, name).load_state_dict(state)
