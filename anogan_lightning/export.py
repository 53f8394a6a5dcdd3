"""Export a trained model's scorer as one graph:
``python -m anogan_lightning.export ckpt=<model.ckpt> format=onnx|torchscript [out=<file>]``.

The graph takes a batch of preprocessed B-scans x (B, C, S, S) in [-1, 1] (B free, C and S the
model's) and returns (score (B,), amap (B, 1, S, S)), computed by the method's own ``score()``
(wrapped by :class:`Scorer`, so the exported scores are the checkpoint's, not a copy of its
formula). Beside the file, ``<file>.json`` (the sidecar) records what a deployment needs to
apply the same decision: the method, the score's name, the input shape, the validation
threshold (anomalous when score >= threshold), the training run's data settings and its
B-scan preprocessing record where the checkpoint has one (predict rebuilds the preprocessing
from them as from the checkpoint), the score components the checkpoint reports (the graph
returns the score and the map only), the torch version, and the parity check the export ran;
``MODEL_CARD.md`` (:mod:`anogan_lightning.model_card`) says what the model is for and how well
it did: intended use, training data, threshold, and the test AUROCs of the run's results.json.

Formats: ``onnx`` (``.onnx``, one file, through ``torch.onnx.export``'s torch.export-based
exporter; run with onnxruntime) and ``torchscript`` (``.pt``, ``torch.jit.trace``; run with
``torch.jit.load``). ONNX needs the ``export`` extra. Exportable: every method whose scoring
is one forward pass (autoencoder, pix2pix #1/#2, Sparse-GAN, aCAE, f-AnoGAN). AnoGAN and GAN_R
score by an optimisation per image (a latent search back-propagating through the generator),
which is no fixed graph: exporting them stops with an error saying so.

After writing, the file is loaded as predict loads it (:mod:`anogan_lightning.exported`) and
its scores and maps are compared with the checkpoint's on random batches of another size than
the traced one (``verify=true``, default): an export that disagrees beyond rtol = atol = 1e-4
is deleted and stops with the difference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from anogan_lightning import exported, model_card
from anogan_lightning.extras import MissingExtraError, require
from anogan_lightning.predict import load_checkpoint

VERIFY_BATCHES = (1, 3)  # batch sizes checked after export (the trace used 2)
RTOL = ATOL = 1e-4
ONNX_SINGLE_FILE_BYTES = 1 << 30  # larger weights go to <file>.data (protobuf's 2 GB limit)


class NotExportableError(ValueError):
    """The method's scoring is not one forward pass."""


class ParityError(RuntimeError):
    """The exported file's scores or maps differ from the checkpoint's."""


class Scorer(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> (score (B,), amap (B, 1, S, S)) by ``method.score``."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.method.score({"x": x})
        return out["score"].float(), out["amap"].float()


def check_exportable(model) -> None:
    """Methods that back-propagate at test time (``needs_grad_at_test``) score by a search."""
    if getattr(model, "needs_grad_at_test", False):
        raise NotExportableError(
            f"{type(model).__name__} cannot be exported as one graph: it scores each image by "
            "an optimisation (a latent search of mapping_steps gradient steps through the "
            "generator), not by a forward pass; score it from its checkpoint with python -m "
            "anogan_lightning.predict"
        )


def input_shape(model, data: dict) -> tuple[int, int, int]:
    """(C, S, S) the model scores."""
    hp = model.hparams
    size = int(hp.get("image_size", data.get("image_size", 0)))
    if size <= 0:
        raise ValueError(f"{type(model).__name__}: no image_size in its hyperparameters")
    return int(hp.get("channels", 1)), size, size


def _inputs(batch: int, shape: tuple[int, int, int], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=g) * 2 - 1


@contextlib.contextmanager
def _tracing():
    """LightningModule's ``trainer`` property raises outside a Trainer, and the tracers probe
    every attribute: mark modules as being scripted, as ``LightningModule.to_torchscript``
    does. Tracer warnings are silenced (torch's own shape checks emit them); the export is
    verified on other batch sizes instead."""
    try:
        from pytorch_lightning.core.module import _jit_is_scripting
    except ImportError:  # a Lightning without the flag: nothing to mark
        _jit_is_scripting = contextlib.nullcontext
    # the exporter's progress and notes ("torchvision is not installed. Skipping ...",
    # optimiser passes): errors only
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with _jit_is_scripting(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*is deprecated")
            warnings.filterwarnings("ignore", message=r".*LeafSpec")
            yield
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _to_onnx(scorer: Scorer, example: Tensor, out: Path) -> dict:
    onnx = require("onnx", "exporting to ONNX")
    require("onnxscript", "exporting to ONNX")
    weight_bytes = sum(p.numel() * p.element_size() for p in scorer.parameters())
    external = weight_bytes > ONNX_SINGLE_FILE_BYTES
    with _tracing(), torch.no_grad():
        torch.onnx.export(
            scorer,
            (example,),
            str(out),
            input_names=["x"],
            output_names=["score", "amap"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    proto = onnx.load(str(out), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"onnx_opset": opset, "external_data": f"{out.name}.data" if external else None}


def _to_torchscript(scorer: Scorer, example: Tensor, out: Path) -> dict:
    with _tracing(), torch.no_grad():
        traced = torch.jit.trace(scorer, example, check_trace=False)
    traced.save(str(out))
    return {}


def _score_name(model, example: Tensor) -> str:
    """The component the score is (e.g. pix2pix's ``latent``), or ``score`` when it is a
    combination of its own (AnoGAN's A, f-AnoGAN's A_R + κ·A_D, ...)."""
    with torch.no_grad():
        out = model.score({"x": example})
    same = [c for c in model.components if c in out and torch.equal(out[c], out["score"])]
    return same[0] if same else "score"


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def check_parity(model, path: Path, shape: tuple[int, int, int]) -> dict:
    """Exported vs checkpoint scores and maps on random batches; an error beyond tolerance."""
    scorer = exported.ExportedScorer(path)
    diffs = {"score": 0.0, "amap": 0.0}
    for i, b in enumerate(VERIFY_BATCHES):
        x = _inputs(b, shape, seed=1 + i)
        with torch.no_grad():
            ref = model.score({"x": x})
        got = dict(zip(("score", "amap"), scorer(x), strict=True))
        for key in diffs:
            want = ref[key].float()
            if got[key].shape != want.shape:
                raise ParityError(
                    f"{path}: {key} of shape {tuple(got[key].shape)} for a batch of {b}, the "
                    f"checkpoint's is {tuple(want.shape)}"
                )
            diffs[key] = max(diffs[key], float((got[key] - want).abs().max()))
            if not torch.allclose(got[key], want, rtol=RTOL, atol=ATOL):
                raise ParityError(
                    f"{path}: the exported {key} differs from the checkpoint's by up to "
                    f"{diffs[key]:.3g} (tolerance rtol = atol = {RTOL:g}); the file is removed "
                    "(verify=false keeps it unchecked)"
                )
    return {
        "batch_sizes": list(VERIFY_BATCHES),
        "max_abs_diff_score": diffs["score"],
        "max_abs_diff_amap": diffs["amap"],
        "rtol": RTOL,
        "atol": ATOL,
    }


def export(
    ckpt: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    verify: bool = True,
    card: bool = True,
) -> Path:
    """Export ``ckpt``'s scorer to ``out`` (default: beside the checkpoint, same stem) and write
    ``<out>.json`` and (``card``) ``MODEL_CARD.md`` beside it; returns the exported file's
    path."""
    if fmt not in exported.FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {', '.join(exported.FORMATS)}")
    ckpt = Path(ckpt)
    suffix = exported.FORMATS[fmt]
    out = Path(out) if out else ckpt.with_suffix(suffix)
    if out.suffix.lower() != suffix:
        raise ValueError(f"out={out}: a {fmt} file ends in {suffix}")
    model, record = load_checkpoint(ckpt, torch.device("cpu"))
    data = record.get("data", {})
    check_exportable(model)
    model.float()
    shape = input_shape(model, data)
    example = _inputs(2, shape, seed=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = (_to_onnx if fmt == "onnx" else _to_torchscript)(Scorer(model).eval(), example, out)
    threshold = float(model.threshold)
    meta = {
        "sidecar_version": exported.SIDECAR_VERSION,
        "format": fmt,
        "file": out.name,
        "method": f"{type(model).__module__}.{type(model).__qualname__}",
        "score": _score_name(model, example),
        "components": list(model.components),
        "input_name": "x",
        "input_shape": ["batch", *shape],
        "input_range": [-1.0, 1.0],
        "outputs": {"score": ["batch"], "amap": ["batch", 1, shape[1], shape[2]]},
        "threshold": None if math.isnan(threshold) else threshold,
        "rule": "score >= threshold",
        "data": _json_safe(data),
        # how a B-scan file becomes input (BScanPreprocessing.to_dict()), where the checkpoint
        # records it; predict rebuilds it from "data" otherwise
        **({"preprocessing": record["preprocessing"]} if record.get("preprocessing") else {}),
        # the site calibration of a calibrated checkpoint (anogan_lightning.calibrate)
        **({"calibration": record["calibration"]} if record.get("calibration") else {}),
        "hparams": _json_safe(dict(model.hparams)),
        "checkpoint": str(ckpt.resolve()),
        "torch": str(torch.__version__),
        "provenance": _json_safe(getattr(model, "provenance", {})),  # the training run's
        **extra,
    }
    side = exported.sidecar_path(out)
    side.write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        try:
            meta["parity"] = check_parity(model, out, shape)
        except ParityError:  # not a file to deploy
            for f in (out, side, out.with_name(f"{out.name}.data")):
                f.unlink(missing_ok=True)
            raise
        side.write_text(json.dumps(meta, indent=2) + "\n")
    if card:  # from the checkpoint and its run's results.json (anogan_lightning.model_card)
        model_card.write(ckpt, out.with_name(model_card.NAME))
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        out = export(cfg.ckpt, cfg["format"], cfg.out, cfg.verify)
    except (FileNotFoundError, ValueError, MissingExtraError, ParityError) as e:
        sys.exit(f"error: {e}")
    parity = json.loads(exported.sidecar_path(out).read_text()).get("parity")
    note = ""
    if parity:
        note = (
            f"; max |score - checkpoint's| {parity['max_abs_diff_score']:.2g}, "
            f"max |amap - checkpoint's| {parity['max_abs_diff_amap']:.2g}"
        )
    print(
        f"exported {cfg['format']}: {out} (sidecar {exported.sidecar_path(out).name}, "
        f"{model_card.NAME}){note}"
    )


if __name__ == "__main__":
    main()
