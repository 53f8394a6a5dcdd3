"""MODEL_CARD.md: written by export beside the exported file (and by predict model_card=true),
with every section, and numbers equal to the run's results.json and checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_cfg, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from anogan_lightning import model_card
from anogan_lightning.export import export
from anogan_lightning.predict import predict
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny auto-encoder run with a second test set (extra_test ``other``)."""
    out = tmp_path_factory.mktemp("run")
    run(compose_cfg([*tiny_overrides("autoencoder"), "+extra_test={other:{seed:7}}"], out))
    return out


def _table(card: str, head: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with ``head``, as cells."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _ci(results: dict, key: str) -> str:
    return f"[{results[key + '_ci_low']:.4f}, {results[key + '_ci_high']:.4f}]"


def test_export_writes_the_card_with_the_runs_numbers(trained: Path, tmp_path: Path):
    out = export(trained / "checkpoints/model.ckpt", "torchscript", tmp_path / "m.pt", verify=False)
    card = (out.parent / model_card.NAME).read_text()
    results = json.loads((trained / "results.json").read_text())

    headings = [line[3:] for line in card.splitlines() if line.startswith("## ")]
    assert headings == list(model_card.SECTIONS)
    assert "not for diagnosis" in card.lower()

    # every test set the run scored, with its AUROC, CI, AP and operating point
    rows = _table(card, "| test set | normal |")
    assert [r[0] for r in rows] == ["test", "test_other"]
    labels = {"test": "scores.csv", "test_other": "scores_other.csv"}
    for name, normal, anomalous, auroc, ci, ap, sens, spec in rows:
        assert auroc == f"{results[f'{name}/auroc']:.4f}" and ci == _ci(results, f"{name}/auroc")
        assert ap == f"{results[f'{name}/ap']:.4f}"
        assert sens == f"{results[f'{name}/sensitivity_at_val_threshold']:.4f}"
        assert spec == f"{results[f'{name}/specificity_at_val_threshold']:.4f}"
        scored = (trained / labels[name]).read_text().splitlines()[1:]
        assert int(normal) + int(anomalous) == len(scored) and int(anomalous) > 0
    assert (rows[1][1], rows[1][2]) == tuple(
        str(results[f"data/test_other_{c}"]) for c in ("normal", "anomalous")
    )
    # and per class
    per_class = _table(card, "| test set | class |")
    expected = [
        (p, k.split("/")[-1])
        for p in ("test", "test_other")
        for k in results
        if k.startswith(f"{p}/auroc/") and not k.endswith(("_ci_low", "_ci_high"))
    ]
    assert len(expected) >= 4 and [(r[0], r[1]) for r in per_class] == expected
    for p, cls, auroc, ci in per_class:
        key = f"{p}/auroc/{cls}"
        assert auroc == f"{results[key]:.4f}" and ci == _ci(results, key)

    # the threshold: the checkpoint's, chosen on validation (Youden)
    ckpt = torch.load(trained / "checkpoints/model.ckpt", map_location="cpu", weights_only=False)
    threshold = float(ckpt["state_dict"]["threshold"])
    assert threshold == pytest.approx(results["val/youden_threshold"])
    assert f"**{threshold:.8g}**" in card and "Youden" in card
    assert f"Validation AUROC {results['val/auroc']:.4f} {_ci(results, 'val/auroc')}" in card
    # training data: counts and the file-list digest of each split
    split_rows = {r[0]: r for r in _table(card, "| split | files |")}
    for split in ("train", "val", "test"):
        assert split_rows[split][1] == str(results[f"provenance/data_{split}_files"])
        assert split_rows[split][4] == f"`{results[f'provenance/data_{split}_sha256']}`"
    assert split_rows["train"][2:4] == [str(results["data/train_normal"]), "0"]
    # preprocessing: the data settings; failure modes: the fixed list
    assert "SyntheticOCTDataModule" in card.split("## Preprocessing")[1]
    assert "Another device's scans shift the scores" in card
    assert "threshold needs calibration" in card


def test_predict_writes_the_card_on_request(trained: Path, tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                f"ckpt={trained / 'checkpoints/model.ckpt'}",
                f"input={_one_png(tmp_path)}",
                f"output_dir={tmp_path / 'pred'}",
                "heatmaps=false",
                "model_card=true",
            ],
        )
    predict(cfg)
    card = (tmp_path / "pred" / model_card.NAME).read_text()
    assert card == model_card.build(trained / "checkpoints/model.ckpt")


def _one_png(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = folder / "scan.png"
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(path)
    return path


def test_without_results_the_card_says_so(trained: Path, tmp_path: Path):
    ckpt = tmp_path / "model.ckpt"  # a checkpoint without its run folder
    ckpt.write_bytes((trained / "checkpoints/model.ckpt").read_bytes())
    card = model_card.build(ckpt)
    assert "Unknown: no results.json" in card and "| test set |" not in card
    assert [h for h in card.splitlines() if h.startswith("## ")][-1] == "## Known failure modes"


def test_results_of_another_run_are_refused(trained: Path, tmp_path: Path):
    results = json.loads((trained / "results.json").read_text())
    results["provenance/data_train_sha256"] = "0" * 64
    other = tmp_path / "results.json"
    other.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="another run"):
        model_card.build(trained / "checkpoints/model.ckpt", other)
    assert model_card.main([str(trained / "checkpoints/model.ckpt"), "--results", str(other)]) == 2


def test_an_incomplete_run_has_no_performance(trained: Path, tmp_path: Path):
    results = {"status": "incomplete", "reason": "stage 2 never ran"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    card = model_card.build(trained / "checkpoints/model.ckpt", path)
    assert "training did not complete (stage 2 never ran)" in card
    threshold = card.split("## Decision threshold")[1].split("**")[1]
    assert not math.isnan(float(threshold))  # the checkpoint's, still shown
