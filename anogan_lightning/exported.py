"""Run an exported scorer (``python -m anogan_lightning.export``): an ONNX file (onnxruntime) or
a TorchScript file (``torch.jit.load``), with the JSON sidecar written beside it.

The graph takes preprocessed B-scans x (B, C, S, S) in [-1, 1] and returns (score (B,),
amap (B, 1, S, S)). The sidecar ``<file>.json`` carries what a deployment needs to apply the
same decision as the checkpoint: the input shape, the validation threshold (``score >=
threshold`` is anomalous) and the training run's data settings (the preprocessing).
:class:`ExportedScorer` has the interface :mod:`anogan_lightning.predict` uses of a method
(``score``, ``threshold``, ``components``, ``hparams``), so predict scores with either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anogan_lightning.extras import require

#: exported file suffix per format
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_SUFFIXES = tuple(FORMATS.values())
SIDECAR_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of an exported file; an error naming the file when it is missing or bad."""
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"{path}: no sidecar {side.name} beside it (python -m anogan_lightning.export "
            "writes one with the threshold and the preprocessing settings)"
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side}: not valid JSON ({e})") from None
    missing = [k for k in ("format", "method", "input_shape", "threshold", "data") if k not in meta]
    if missing:
        raise ValueError(f"{side}: not an anogan_lightning export sidecar (no {missing})")
    return meta


class ExportedScorer:
    """An exported graph with its sidecar, used like a method by predict.

    The graph returns the score and the anomaly map only, so ``components`` is empty.
    """

    needs_grad_at_test = False
    components: tuple[str, ...] = ()

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {self.path} does not exist")
        self.meta = read_sidecar(self.path)
        self.format = self.meta["format"]
        if FORMATS.get(self.format) != self.path.suffix.lower():
            raise ValueError(
                f"{self.path}: the sidecar says format {self.format!r}, the suffix "
                f"{self.path.suffix!r} (expected {' or '.join(EXPORT_SUFFIXES)})"
            )
        self.device = torch.device(device)
        _, c, h, w = self.meta["input_shape"]
        self.input_shape = (int(c), int(h), int(w))
        self.hparams = {"channels": int(c), "image_size": int(h)}
        t = self.meta["threshold"]
        self.threshold = math.nan if t is None else float(t)
        if self.format == "onnx":
            ort = require("onnxruntime", "running an ONNX model")
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in (
                ort.get_available_providers()
            ):
                providers.insert(0, "CUDAExecutionProvider")
            self._session = ort.InferenceSession(str(self.path), providers=providers)
        else:
            try:
                self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
            except RuntimeError as e:
                raise ValueError(f"{self.path}: not a TorchScript file ({e})") from None

    @property
    def data_config(self) -> dict:
        return self.meta["data"]

    @property
    def provenance(self) -> dict:
        """The training run's provenance, as the checkpoint held it at export."""
        return self.meta.get("provenance", {})

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, S, S) in [-1, 1] -> (score (B,), amap (B, 1, S, S)), on x's device."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.path} takes (B, {', '.join(map(str, self.input_shape))}) inputs, "
                f"got {tuple(x.shape)}"
            )
        if self.format == "onnx":
            feed = {"x": np.ascontiguousarray(x.detach().float().cpu().numpy())}
            score, amap = (torch.from_numpy(a).to(x.device) for a in self._session.run(None, feed))
            return score, amap
        with torch.no_grad():
            score, amap = self._module(x.detach().float().to(self.device))
        return score.to(x.device), amap.to(x.device)

    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        score, amap = self(batch["x"])
        return {"score": score, "amap": amap}


def load_exported(path: str | Path, device: torch.device | str = "cpu"):
    """(the scorer, the training run's data settings) of an exported file, as
    :func:`anogan_lightning.predict.load_model` gives them for a checkpoint."""
    scorer = ExportedScorer(path, device)
    return scorer, scorer.data_config
