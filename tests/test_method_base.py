"""methods/base.py: the checkpoint format every method writes, and the refusal of checkpoints
without it (anogan-lightning 0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from anogan_lightning.methods.autoencoder import AutoEncoder
from anogan_lightning.methods.base import CHECKPOINT_FORMAT
from anogan_lightning.train import run


def _save(model: AutoEncoder, path: Path, meta: dict | None) -> Path:
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.4.0",
    }
    if meta is not None:
        ckpt["anogan_lightning"] = meta
    torch.save(ckpt, path)
    return path


def test_checkpoints_carry_the_format_and_load(tmp_path: Path):
    model = AutoEncoder(width=8, image_size=16)
    meta: dict = {}
    model.data_config = {"image_size": 16}
    model.on_save_checkpoint(meta)
    assert CHECKPOINT_FORMAT == 2 and meta["anogan_lightning"]["format"] == CHECKPOINT_FORMAT
    loaded = AutoEncoder.load_from_checkpoint(
        _save(model, tmp_path / "m.ckpt", meta["anogan_lightning"])
    )
    assert loaded.data_config == {"image_size": 16}


def test_a_checkpoint_of_0_1_is_refused_with_the_remedy(tmp_path: Path):
    model = AutoEncoder(width=8, image_size=16)
    old = _save(model, tmp_path / "old.ckpt", {"class": "x", "data": {}, "provenance": {}})
    with pytest.raises(ValueError, match=r"written by anogan-lightning 0\.1.*retrain"):
        AutoEncoder.load_from_checkpoint(old)
    with pytest.raises(ValueError, match=r"written by anogan-lightning 0\.1"):
        AutoEncoder.load_from_checkpoint(_save(model, tmp_path / "bare.ckpt", None))
    newer = _save(model, tmp_path / "new.ckpt", {"format": CHECKPOINT_FORMAT + 1})
    with pytest.raises(ValueError, match=f"checkpoint format {CHECKPOINT_FORMAT + 1}"):
        AutoEncoder.load_from_checkpoint(newer)
    # an evaluation-only run names the file
    cfg = compose_cfg([*tiny_overrides("autoencoder"), "fit=false", f"ckpt_path={old}"], tmp_path)
    with pytest.raises(
        ValueError, match=r"old\.ckpt: this checkpoint was written by anogan-lightning 0\.1"
    ):
        run(cfg)
