"""The comparison report over run directories: rows, seed aggregation, failed jobs, plots."""

from __future__ import annotations

import csv
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
    results |= {"provenance/commit": f"c{seed}", "provenance/threads": 2}
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
    with open(sweep / "report.csv", newline="") as fh:  # each row names what made it
        table = {r["run"]: r for r in csv.DictReader(fh)}
    assert table["0"]["provenance/commit"] == "c0" and table["2"]["provenance/threads"] == "2"
    assert table["3"]["provenance/commit"] == ""  # the failed run wrote no results.json
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


def test_paired_difference_to_a_reference(tmp_path: Path):
    """--reference: each run's test AUROC minus the reference's on the same images, with a
    paired CI; the reference against itself is exactly 0; seed groups get a pooled difference;
    an incomplete run is listed with its reason."""
    from anogan_lightning.evaluation import metrics

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_run(sweep / f"ae{seed}", "AutoEncoder", ["+method=autoencoder"], 0.6, seed)
        _fake_run(sweep / f"an{seed}", "AnoGAN", ["+method=anogan"], 0.9, seed)
    inc = sweep / "fa0"
    _fake_run(inc, "FAnoGAN", ["+method=fanogan"], 0.5, 0)
    (inc / "results.json").write_text(json.dumps({"status": "incomplete", "reason": "no stage 2"}))
    assert report.main([str(sweep), "--reference", "autoencoder"]) == 0
    md = (sweep / "report.md").read_text()
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "+0.0000 [+0.000, +0.000]" in rows["ae0"] and "+0.0000 [+0.000, +0.000]" in rows["ae1"]
    # the AnoGAN run of seed 1 against the auto-encoder run of seed 1, recomputed here
    a, b = report.read_scores(sweep / "an1"), report.read_scores(sweep / "ae1")
    _, sa, sb, labels = report.matched_scores(a, b)
    diff, low, high = metrics.paired_auroc_difference(sa, sb, labels)
    assert f"{diff:+.4f} [{low:+.3f}, {high:+.3f}]" in rows["an1"]
    assert low > 0  # a real gap: 0.9 vs 0.6 separation on 40 images
    group = next(ln for ln in md.splitlines() if ln.startswith("| AnoGAN | "))
    pooled = metrics.pooled_paired_difference(
        [
            report.matched_scores(
                report.read_scores(sweep / f"an{s}"), report.read_scores(sweep / f"ae{s}")
            )[1:]
            for s in (0, 1)
        ],
        same_images=True,
    )
    assert group.endswith(f"{pooled[0]:+.4f} [{pooled[1]:+.3f}, {pooled[2]:+.3f}] |")
    assert "fa0 (+method=fanogan): incomplete: no stage 2" in md
    csv_rows = (sweep / "report.csv").read_text().splitlines()
    assert sum(",incomplete," in r for r in csv_rows) == 1
    assert report.main([str(sweep), "--reference", "nosuchmethod"]) == 2


def test_pooled_difference_resamples_seeds_too():
    """With seeds that disagree, the pooled interval is wider than the image-only one."""
    from anogan_lightning.evaluation import metrics

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    base = torch.randn(200, generator=g) + labels
    pairs = [(base + shift * labels, base, labels) for shift in (0.0, 0.5, 1.0)]
    diff, low, high = metrics.pooled_paired_difference(pairs, same_images=True)
    one = [metrics.paired_auroc_difference(*p) for p in pairs]
    assert diff == pytest.approx(sum(d for d, _, _ in one) / 3)
    assert low < diff < high
    assert high - low > max(h - lo for _, lo, h in one)
    assert metrics.pooled_paired_difference([pairs[0]]) == (0.0, 0.0, 0.0)
