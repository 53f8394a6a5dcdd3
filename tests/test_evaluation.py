"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from anogan_lightning import evaluation

# 4 normals, 4 anomalies; raw scores far outside [0, 1] (no sigmoid may touch them)
SCORES = torch.tensor([100.0, 200.0, 300.0, 450.0, 400.0, 500.0, 600.0, 700.0])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_auroc_hand_computed():
    # pairs (anomaly > normal): 400 beats 3 normals, 500/600/700 beat all 4 -> 15 of 16
    assert evaluation.auroc(SCORES, LABELS) == pytest.approx(15 / 16)
    assert evaluation.auroc(-SCORES, LABELS) == pytest.approx(1 / 16)
    # ties count one half
    assert evaluation.auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == pytest.approx(0.5)


def test_large_raw_scores_are_not_saturated():
    s = torch.tensor([1e4, 1e4 + 1, 1e4 + 2, 1e4 + 3])
    assert evaluation.auroc(s, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)


def test_average_precision_hand_computed():
    # ranking: 700+ 600+ 500+ 450- 400+ ...: precision at each positive 1, 1, 1, 4/5
    assert evaluation.average_precision(SCORES, LABELS) == pytest.approx((3 + 0.8) / 4)


def test_youden_cut_off_and_metrics():
    # threshold 400: tpr 1, fpr 1/4 -> J 0.75; threshold 500: tpr 3/4, fpr 0 -> J 0.75;
    # ties go to the lowest threshold (the more sensitive one)
    t = evaluation.youden_threshold(SCORES, LABELS)
    assert t == 400.0
    m = evaluation.metrics_at_threshold(SCORES, LABELS, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    assert m["precision"] == pytest.approx(4 / 5) and m["recall"] == 1.0
    assert m["accuracy"] == pytest.approx(7 / 8)


def test_roc_curve_endpoints_and_thresholds():
    fpr, tpr, thr = evaluation.roc_curve(SCORES, LABELS)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert math.isinf(thr[0]) and thr[1] == 700 and thr[-1] == 100
    assert torch.all(fpr[1:] >= fpr[:-1]) and torch.all(tpr[1:] >= tpr[:-1])


def test_evaluate_keys_and_val_threshold():
    comps = {"residual": SCORES, "flipped": -SCORES}
    out = evaluation.evaluate(SCORES, LABELS, "test", comps, val_threshold=550.0)
    assert out["test/auroc"] == pytest.approx(15 / 16)
    assert out["test/auroc_flipped"] == pytest.approx(1 / 16)
    # at 550: predicted anomalous = 600, 700 -> accuracy (2 + 4) / 8, sensitivity 2 / 4
    assert out["test/accuracy_at_val_threshold"] == pytest.approx(0.75)
    assert out["test/sensitivity_at_val_threshold"] == pytest.approx(0.5)
    for k in ("ap", "sensitivity", "specificity", "precision", "recall", "youden_threshold"):
        assert f"test/{k}" in out
    assert evaluation.evaluate(SCORES, torch.zeros(8), "val") == {}  # one class only


def test_bad_scores():
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.auroc(torch.tensor([0.0, math.nan]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        evaluation.auroc(torch.zeros(3), torch.tensor([0, 1]))
