"""anogan_lightning.calibrate: a trained checkpoint re-thresholded (and optionally re-normalised)
on a site's normal scans; the calibrated checkpoint is used by predict, export and the model
card like any other and carries what was done."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, train_retina_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from anogan_lightning.calibrate import calibrate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    """A retina run and a 'site' of 24 normal phantoms from another 'device' (brighter, its
    retina thicker), plus one scan without a retina."""
    from test_bscan_windows import save, scan

    tmp = tmp_path_factory.mktemp("calibrate")
    run_dir, _ = train_retina_run(tmp)
    normals = tmp / "site"
    for k in range(24):
        img, _ = scan(seed=100 + k, thickness=70.0)
        save(normals / f"n{k:02d}.png", np.clip(img.astype(np.int16) + 25, 0, 255).astype(np.uint8))
    save(normals / "blank.png", np.full((248, 384), 90, np.uint8))
    return run_dir, normals


def _cfg(name: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_threshold_set_on_the_sites_normals_and_used_by_predict(site, tmp_path: Path):
    run_dir, normals = site
    src = run_dir / "checkpoints/model.ckpt"
    out = tmp_path / "cal"
    ckpt = calibrate(
        _cfg(
            "calibrate",
            f"ckpt={src}",
            f"normals={normals}",
            "specificity=0.9",
            f"output_dir={out}",
            "site=phantom-clinic",
        )
    )
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["n_listed"] == 25 and rec["n_scored"] == 24  # the blank scan is left out
    assert rec["site"] == "phantom-clinic" and rec["statistics"] == []
    before = float(torch.load(src, weights_only=False)["state_dict"]["threshold"])
    assert rec["threshold_before"] == pytest.approx(before)
    saved = torch.load(ckpt, weights_only=False)
    assert float(saved["state_dict"]["threshold"]) == pytest.approx(rec["threshold"], rel=1e-12)
    assert saved["anogan_lightning"]["calibration"] == rec
    scores = np.array([float(r["score"]) for r in _rows(out / "scores.csv") if r["status"] == "ok"])
    assert len(scores) == 24
    assert (scores < rec["threshold"]).mean() == pytest.approx(math.ceil(0.9 * 24) / 24)
    assert rec["specificity_on_calibration_scans"] == pytest.approx(math.ceil(0.9 * 24) / 24)
    # the weights are untouched: predict on the calibrated model gives the same scores, and
    # the decisions follow the new threshold
    from anogan_lightning.predict import predict

    pred = _rows(
        predict(
            _cfg(
                "predict",
                f"ckpt={ckpt}",
                f"input={normals}",
                f"output_dir={tmp_path / 'pred'}",
                "heatmaps=false",
            )
        )
    )
    by_name = {Path(r["path"]).name: r for r in pred if r["status"] == "ok"}
    assert sorted(float(r["score"]) for r in by_name.values()) == pytest.approx(sorted(scores))
    assert sum(int(r["anomalous"]) for r in by_name.values()) == 24 - math.ceil(0.9 * 24)
    prov = json.loads((tmp_path / "pred/provenance.json").read_text())
    assert prov["calibration"]["scans_digest"] == rec["scans_digest"]
    # the model card says how the threshold was chosen, and reads the source run's results
    from anogan_lightning import model_card

    card = model_card.write(ckpt, tmp_path / "MODEL_CARD.md").read_text()
    assert "Site-calibrated" in card and "phantom-clinic" in card
    assert f"{rec['threshold']:.8g}" in card and "## Performance" in card
    assert "no results.json" not in card


def test_csv_of_normals_statistics_and_errors(site, tmp_path: Path):
    run_dir, normals = site
    src = run_dir / "checkpoints/model.ckpt"
    listing = tmp_path / "normals.csv"
    files = sorted(normals.glob("n*.png"))
    listing.write_text("path\n" + "".join(f"{f}\n" for f in files))
    out = tmp_path / "cal"
    ckpt = calibrate(
        _cfg(
            "calibrate",
            f"ckpt={src}",
            f"normals={listing}",
            f"output_dir={out}",
            "adabn=true",
            "map_norm=true",
        )
    )
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["n_scored"] == 24 and rec["statistics"][0].startswith("adabn (")
    assert rec["statistics"][1] == "map_norm"
    old = torch.load(src, weights_only=False)["state_dict"]
    new = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(old) == set(new)
    changed = {k for k in old if k != "threshold" and not torch.equal(old[k], new[k])}
    assert "map_norm" in changed and any(k.endswith("running_mean") for k in changed)
    assert not any(k.endswith((".weight", ".bias")) for k in changed)  # statistics only
    # too few normals, a missing file, a bad specificity: clear errors naming the input
    with pytest.raises(ValueError, match="min_normals=30"):
        calibrate(
            _cfg(
                "calibrate",
                f"ckpt={src}",
                f"normals={listing}",
                f"output_dir={tmp_path / 'x'}",
                "min_normals=30",
            )
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nnot_there.png\n")
    with pytest.raises(FileNotFoundError, match="not_there.png"):
        calibrate(
            _cfg("calibrate", f"ckpt={src}", f"normals={bad}", f"output_dir={tmp_path / 'y'}")
        )
    with pytest.raises(ValueError, match="specificity"):
        calibrate(
            _cfg(
                "calibrate",
                f"ckpt={src}",
                f"normals={normals}",
                "specificity=1.0",
                f"output_dir={tmp_path / 'z'}",
            )
        )
