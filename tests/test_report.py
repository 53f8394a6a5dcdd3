"""The comparison report over run directories: rows, seed aggregation, failed jobs, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from anogan_lightning import report


def _fake_run(d: Path, method: str, overrides: list[str], auroc: float, seed: int) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra/config.yaml").write_text("{}")
    (d / ".hydra/overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    (d / "config.yaml").write_text(
        yaml.safe_dump({"seed": seed, "method": {"_target_": f"x.{method}"}})
    )
    results = {"method": method, "val/auroc": auroc - 0.01, "test/auroc": auroc, "test/ap": 0.5}
    results |= {"test/auroc_residual": auroc - 0.05, "test/pixel_auroc": 0.99}
    (d / "results.json").write_text(json.dumps(results))
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1] * 20)
    scores = labels * 2 * auroc + torch.randn(40, generator=g)
    rows = ["id,label,score"] + [
        f"img{i},{int(lab)},{float(s):.5f}"
        for i, (lab, s) in enumerate(zip(labels, scores, strict=True))
    ]
    (d / "scores.csv").write_text("\n".join(rows) + "\n")


def test_report_rows_seeds_and_failures(tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", "AnoGAN", ["+method=anogan", "method.lambda_fm=0.1"], 0.8, 0)
    _fake_run(sweep / "1", "AnoGAN", ["+method=anogan", "method.lambda_fm=0.1"], 0.9, 1)
    _fake_run(sweep / "2", "Autoencoder", ["+method=autoencoder"], 0.7, 0)
    bad = sweep / "3"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra/config.yaml").write_text("{}")
    (bad / ".hydra/overrides.yaml").write_text(yaml.safe_dump(["+method=fanogan", "seed=0"]))
    (bad / "error.txt").write_text(
        "Traceback ...\nFloatingPointError: training diverged at step 7\n"
    )
    (sweep / "0/wandb/run-x/files").mkdir(parents=True)  # a logger's config is not a run
    (sweep / "0/wandb/run-x/files/config.yaml").write_text("{}")

    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    md = (sweep / "report.md").read_text()
    assert "| 0 | AnoGAN |" in md and "| 1 | AnoGAN |" in md and "| 2 | Autoencoder |" in md
    assert "0.8500 ± 0.0707" in md  # mean ± std of 0.8 and 0.9
    assert "| residual 0.7500 |" in md and "pixel" not in md  # components' test AUROC
    assert "Failed runs (1)" in md and "training diverged at step 7" in md
    assert "0.8500 ± 0.0707" in out
    rows = (sweep / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and sum(",failed," in r for r in rows) == 1
    assert (sweep / "roc.png").stat().st_size > 0
    assert (sweep / "score_distributions.png").stat().st_size > 0


def test_report_on_run_dirs_and_errors(tmp_path: Path, capsys):
    _fake_run(tmp_path / "a", "AnoGAN", [], 0.8, 0)
    _fake_run(tmp_path / "b", "AnoGAN", [], 0.6, 0)
    assert (
        report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    )
    md = (tmp_path / "r/report.md").read_text()
    assert "| a | AnoGAN |" in md and "| b | AnoGAN |" in md
    assert "Mean ± std" not in md  # the same seed twice is not a seed average
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run directories"):
        report.report([tmp_path / "empty"])
