"""Deployable scorer: every method whose scoring is a forward pass exports to ONNX and
TorchScript with the checkpoint's scores and maps (within 1e-4); AnoGAN and GAN_R refuse with
one line; predict scores with an exported file as with its checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, METHODS, REPO, compose_cfg, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from anogan_lightning import exported, method_config, provenance
from anogan_lightning.data.synthetic import make_split
from anogan_lightning.export import NotExportableError, ParityError, export
from anogan_lightning.predict import load_model, predict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIZE = 16


def _needs_grad(method: str) -> bool:
    target = method_config(method)._target_
    return bool(getattr(hydra.utils.get_class(target), "needs_grad_at_test", False))


EXPORTABLE = [m for m in METHODS if not _needs_grad(m)]
NOT_EXPORTABLE = [m for m in METHODS if _needs_grad(m)]


def _train(method: str, out: Path, validate: bool = True) -> Path:
    """A tiny fit (2 batches) and validation (sets the threshold), saved as train.py saves
    model.ckpt (weights, threshold, class and data settings)."""
    pl.seed_everything(0)
    cfg = compose_cfg(tiny_overrides(method, SIZE), out)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    model.data_config = OmegaConf.to_container(cfg.data, resolve=True)
    model.provenance = {**provenance.code(), **provenance.software_and_machine()}  # as train.py
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=not model.needs_grad_at_test,
    )
    trainer.fit(model, DataLoader(make_split(32, SIZE, "train", seed=2), batch_size=16))
    if validate:
        trainer.validate(
            model, DataLoader(make_split(16, SIZE, "val", seed=3), batch_size=16), verbose=False
        )
    trainer.save_checkpoint(out / "model.ckpt")
    return out / "model.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            cache[method] = _train(method, tmp_path_factory.mktemp(f"ckpt_{method}"))
        return cache[method]

    return get


def _run(path: Path, fmt: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The exported file run by its own runtime, without anogan_lightning."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        score, amap = session.run(None, {"x": x.numpy()})
        return score, amap
    module = torch.jit.load(str(path))
    with torch.no_grad():
        score, amap = module(x)
    return score.numpy(), amap.numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("method", EXPORTABLE)
def test_exported_scores_equal_the_checkpoints(method: str, fmt: str, checkpoints, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    ckpt = checkpoints(method)
    out = export(ckpt, fmt, tmp_path / f"{method}{exported.FORMATS[fmt]}")
    model, data = load_model(ckpt, torch.device("cpu"))
    x = make_split(5, SIZE, "test", seed=4).images  # (5, 1, S, S): not the traced batch size
    with torch.no_grad():
        ref = model.score({"x": x})
    score, amap = _run(out, fmt, x)
    assert score.shape == (5,) and amap.shape == (5, 1, SIZE, SIZE)
    np.testing.assert_allclose(score, ref["score"].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(amap, ref["amap"].numpy(), rtol=1e-5, atol=1e-4)
    assert np.ptp(score) > 0  # the batch's scores differ: a constant graph would fail here

    meta = json.loads(exported.sidecar_path(out).read_text())
    assert meta["format"] == fmt and meta["file"] == out.name
    assert meta["method"] == f"{type(model).__module__}.{type(model).__qualname__}"
    assert meta["input_shape"] == ["batch", 1, SIZE, SIZE]
    threshold = float(model.threshold)
    assert math.isfinite(threshold) and meta["threshold"] == pytest.approx(threshold)
    assert meta["data"] == data == model.data_config and meta["data"]["image_size"] == SIZE
    assert meta["components"] == list(model.components)
    assert meta["torch"] == torch.__version__
    expected = model.hparams.get("score_space", "score")  # pix2pix / Sparse-GAN: a component
    assert meta["score"] == expected
    assert meta["parity"]["max_abs_diff_score"] <= 1e-4


@pytest.mark.parametrize("method", NOT_EXPORTABLE)
def test_latent_search_methods_refuse(method: str, tmp_path: Path):
    ckpt = _train(method, tmp_path, validate=False)
    with pytest.raises(NotExportableError, match=r"cannot be exported as one graph: .* optimisa"):
        export(ckpt, "torchscript", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_bad_format_and_suffix(checkpoints, tmp_path: Path):
    ckpt = checkpoints("autoencoder")
    with pytest.raises(ValueError, match="format='tflite'"):
        export(ckpt, "tflite")
    with pytest.raises(ValueError, match=r"a torchscript file ends in \.pt"):
        export(ckpt, "torchscript", tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nowhere.ckpt", "torchscript")


def test_an_export_that_disagrees_is_removed(checkpoints, tmp_path: Path, monkeypatch):
    """The parity check catches a graph whose scores drift (here: shifted by 1e-3)."""
    real = exported.ExportedScorer.__call__
    monkeypatch.setattr(
        exported.ExportedScorer,
        "__call__",
        lambda self, x: (real(self, x)[0] + 1e-3, real(self, x)[1]),
    )
    with pytest.raises(ParityError, match=r"the exported score differs .* by up to 0\.001"):
        export(checkpoints("autoencoder"), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def _predict(model_file: Path, inp: Path, out: Path, *overrides: str) -> list[dict]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[f"ckpt={model_file}", f"input={inp}", f"output_dir={out}", *overrides],
        )
    with open(predict(cfg), newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_with_an_exported_file_as_with_its_checkpoint(checkpoints, tmp_path: Path):
    from PIL import Image

    ckpt = checkpoints("autoencoder")
    scans = tmp_path / "scans"
    scans.mkdir()
    ds = make_split(6, 64, "test", seed=5)  # larger than the model: resized as in training
    for i in range(6):
        img = ((ds.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(img).save(scans / f"scan_{i}.png")
    (scans / "broken.png").write_bytes(b"not a png")
    base = _predict(ckpt, scans, tmp_path / "ckpt", "batch_size=4")
    formats = ["torchscript"]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401

        formats.append("onnx")
    except ImportError:
        pass
    for fmt in formats:
        model_file = export(ckpt, fmt, tmp_path / f"model{exported.FORMATS[fmt]}")
        rows = _predict(model_file, scans, tmp_path / fmt, "batch_size=4")
        assert [r["path"] for r in rows] == [r["path"] for r in base]
        assert [r["status"] for r in rows] == [r["status"] for r in base]
        assert sum(r["status"] == "unreadable" for r in rows) == 1
        names = set(rows[0])
        assert names == set(base[0]) - {"l1", "latent"}  # the graph returns no components
        for a, b in zip(rows, base, strict=True):
            if a["status"] != "ok":
                continue
            assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-5, abs=1e-4)
            assert a["threshold"] == b["threshold"] and a["threshold"]  # from the sidecar
            assert a["anomalous"] == b["anomalous"] in ("0", "1")
        assert len(list((tmp_path / fmt / "heatmaps").glob("*.png"))) == 6
        # the training run's provenance travels through the sidecar into predict's record
        info = json.loads((tmp_path / fmt / "provenance.json").read_text())
        ref = json.loads((tmp_path / "ckpt" / "provenance.json").read_text())
        assert info["training"] == ref["training"] and info["training"]["torch"]
        assert info["predict"]["command"]
    # a threshold override applies to exported files too
    rows = _predict(tmp_path / "model.pt", scans, tmp_path / "low", "threshold=-1")
    assert all(r["anomalous"] == "1" for r in rows if r["status"] == "ok")


def test_exported_file_without_or_with_a_bad_sidecar(checkpoints, tmp_path: Path):
    out = export(checkpoints("autoencoder"), "torchscript", tmp_path / "m.pt", verify=False)
    side = exported.sidecar_path(out)
    assert side.name == "m.pt.json" and "parity" not in json.loads(side.read_text())
    scorer, data = load_model(out, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"takes \(B, 1, 16, 16\) inputs"):
        scorer(torch.zeros(2, 1, 32, 32))
    side.write_text("{}")
    with pytest.raises(ValueError, match="not an anogan_lightning export sidecar"):
        load_model(out, torch.device("cpu"))
    side.unlink()
    with pytest.raises(FileNotFoundError, match=r"no sidecar m\.pt\.json"):
        load_model(out, torch.device("cpu"))


def test_command_line(checkpoints, tmp_path: Path):
    """The CLI writes the file, its sidecar and the model card only; AnoGAN stops with one
    line."""
    ckpt = checkpoints("autoencoder")
    anogan = _train("anogan", tmp_path / "anogan", validate=False)
    code = f"""
    import runpy, sys
    for args in (["ckpt={ckpt}", "format=torchscript"], ["ckpt={anogan}"]):
        sys.argv = ["export", *args]
        try:
            runpy.run_module("anogan_lightning.export", run_name="__main__")
        except SystemExit as e:
            print("EXIT", e.code)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    pt = ckpt.with_suffix(".pt")  # out=null: beside the checkpoint
    assert lines[0].startswith(f"exported torchscript: {pt} (sidecar model.pt.json, MODEL_CARD.md)")
    assert pt.is_file() and exported.sidecar_path(pt).is_file()
    assert (pt.parent / "MODEL_CARD.md").is_file()
    assert lines[1] == (
        "EXIT error: AnoGAN cannot be exported as one graph: it scores each image by an "
        "optimisation (a latent search of mapping_steps gradient steps through the generator), "
        "not by a forward pass; score it from its checkpoint with python -m "
        "anogan_lightning.predict"
    )
    assert list(work.iterdir()) == []  # no run directory, no log file
