"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from anogan_lightning.evaluation import metrics

# 4 normals, 4 anomalies; raw scores far outside [0, 1] (no sigmoid may touch them)
SCORES = torch.tensor([100.0, 200.0, 300.0, 450.0, 400.0, 500.0, 600.0, 700.0])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_auroc_hand_computed():
    # pairs (anomaly > normal): 400 beats 3 normals, 500/600/700 beat all 4 -> 15 of 16
    assert metrics.auroc(SCORES, LABELS) == pytest.approx(15 / 16)
    assert metrics.auroc(-SCORES, LABELS) == pytest.approx(1 / 16)
    # ties count one half
    assert metrics.auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == pytest.approx(0.5)


def test_large_raw_scores_are_not_saturated():
    s = torch.tensor([1e4, 1e4 + 1, 1e4 + 2, 1e4 + 3])
    assert metrics.auroc(s, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)


def test_average_precision_hand_computed():
    # ranking: 700+ 600+ 500+ 450- 400+ ...: precision at each positive 1, 1, 1, 4/5
    assert metrics.average_precision(SCORES, LABELS) == pytest.approx((3 + 0.8) / 4)


def test_youden_cut_off_and_metrics():
    # threshold 400: tpr 1, fpr 1/4 -> J 0.75; threshold 500: tpr 3/4, fpr 0 -> J 0.75;
    # ties go to the lowest threshold (the more sensitive one)
    t = metrics.youden_threshold(SCORES, LABELS)
    assert t == 400.0
    m = metrics.metrics_at_threshold(SCORES, LABELS, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    assert m["precision"] == pytest.approx(4 / 5) and m["recall"] == 1.0
    assert m["accuracy"] == pytest.approx(7 / 8)


def test_roc_curve_endpoints_and_thresholds():
    fpr, tpr, thr = metrics.roc_curve(SCORES, LABELS)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert math.isinf(thr[0]) and thr[1] == 700 and thr[-1] == 100
    assert torch.all(fpr[1:] >= fpr[:-1]) and torch.all(tpr[1:] >= tpr[:-1])


def test_evaluate_keys_and_val_threshold():
    comps = {"residual": SCORES, "flipped": -SCORES}
    out = metrics.evaluate(SCORES, LABELS, "test", comps, val_threshold=550.0)
    assert out["test/auroc"] == pytest.approx(15 / 16)
    assert out["test/auroc_flipped"] == pytest.approx(1 / 16)
    # at 550: predicted anomalous = 600, 700 -> accuracy (2 + 4) / 8, sensitivity 2 / 4
    assert out["test/accuracy_at_val_threshold"] == pytest.approx(0.75)
    assert out["test/sensitivity_at_val_threshold"] == pytest.approx(0.5)
    for k in ("ap", "sensitivity", "specificity", "precision", "recall", "youden_threshold"):
        assert f"test/{k}" in out
    assert metrics.evaluate(SCORES, torch.zeros(8), "val") == {}  # one class only


def test_bad_scores():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.auroc(torch.tensor([0.0, math.nan]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        metrics.auroc(torch.zeros(3), torch.tensor([0, 1]))


def _noisy(n: int, seed: int = 0, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    return torch.randn(n, generator=g) + shift * labels, labels


def test_weighted_auroc_with_unit_weights_is_the_auroc_ties_included():
    scores, labels = _noisy(200)
    for s in (scores, torch.round(scores)):  # rounding makes many ties
        got = metrics.weighted_aurocs(s, labels, torch.ones(1, 200))
        assert float(got[0, 0]) == pytest.approx(metrics.auroc(s, labels), abs=1e-6)


def test_weighted_auroc_equals_the_auroc_of_the_copied_resample():
    scores, labels = _noisy(60, seed=1)
    weights = metrics.bootstrap_weights(labels, n_boot=5, seed=3)
    got = metrics.weighted_aurocs(scores, labels, weights)[:, 0]
    for b in range(5):
        idx = torch.repeat_interleave(torch.arange(60), weights[b].long())
        assert float(got[b]) == pytest.approx(metrics.auroc(scores[idx], labels[idx]))


def test_bootstrap_is_stratified_and_seeded():
    _, labels = _noisy(30)
    w = metrics.bootstrap_weights(labels, n_boot=50, seed=7)
    assert torch.all(w[:, labels == 0].sum(1) == 15) and torch.all(w[:, labels == 1].sum(1) == 15)
    torch.testing.assert_close(w, metrics.bootstrap_weights(labels, n_boot=50, seed=7))
    assert not torch.equal(w, metrics.bootstrap_weights(labels, n_boot=50, seed=8))


def test_ci_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 400, 1600):
        scores, labels = _noisy(n)
        low, high = metrics.auroc_ci(scores, labels)
        assert low < metrics.auroc(scores, labels) < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~1/sqrt(n)


def test_paired_difference_of_a_run_with_itself_is_zero_and_a_real_gap_excludes_zero():
    scores, labels = _noisy(400)
    assert metrics.paired_auroc_difference(scores, scores, labels) == (0.0, 0.0, 0.0)
    g = torch.Generator().manual_seed(5)
    worse = scores + 1.5 * torch.randn(400, generator=g)
    diff, low, high = metrics.paired_auroc_difference(scores, worse, labels)
    assert diff == pytest.approx(metrics.auroc(scores, labels) - metrics.auroc(worse, labels))
    assert 0 < low < diff < high


def test_per_class_auroc_is_the_auroc_of_the_subset():
    scores, labels = _noisy(90)
    classes = [
        "NORMAL" if y == 0 else ("CNV", "DME", "DRUSEN")[i % 3] for i, y in enumerate(labels)
    ]
    out = metrics.evaluate(scores, labels, "test", classes=classes)
    for name in ("CNV", "DME", "DRUSEN"):
        keep = torch.tensor([c in ("NORMAL", name) for c in classes])
        assert out[f"test/auroc/{name}"] == pytest.approx(metrics.auroc(scores[keep], labels[keep]))
        low, high = out[f"test/auroc/{name}_ci_low"], out[f"test/auroc/{name}_ci_high"]
        assert low <= out[f"test/auroc/{name}"] <= high
    assert "test/auroc/NORMAL" not in out
    assert out["test/auroc_ci_low"] < out["test/auroc"] < out["test/auroc_ci_high"]
    assert "test/auroc_ci_low" not in metrics.evaluate(scores, labels, "test", n_boot=0)
