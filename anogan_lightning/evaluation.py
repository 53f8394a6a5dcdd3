"""Image-level evaluation: AUROC, AP, ROC, Youden cut-off, threshold carried from val to test.

Scores are raw and higher means more anomalous. torchmetrics applies a sigmoid to predictions
outside [0, 1], which saturates large raw scores (sums of residuals reach hundreds) into ties
and silently returns AUROC 0.5. So scores are first replaced by their dense ranks scaled to
[0, 1]: an order-preserving map that keeps ties, under which every rank metric is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
)


def _unit_ranks(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(dense ranks of ``scores`` scaled to [0, 1], the sorted unique raw values)."""
    uniq, inverse = torch.unique(scores.double(), sorted=True, return_inverse=True)
    denom = max(len(uniq) - 1, 1)
    return inverse.double() / denom, uniq


def _check(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).detach().flatten().double().cpu()
    labels = torch.as_tensor(labels).detach().flatten().long().cpu()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).sum())} non-finite anomaly scores")
    return scores, labels


def has_both_classes(labels: Tensor) -> bool:
    labels = torch.as_tensor(labels)
    return bool((labels == 0).any() and (labels == 1).any())


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(fpr, tpr, thresholds in raw score units); predicted anomalous when score >= threshold.

    The first point (0, 0) has threshold +inf.
    """
    scores, labels = _check(scores, labels)
    ranks, uniq = _unit_ranks(scores)
    fpr, tpr, _ = binary_roc(ranks, labels)
    # torchmetrics' thresholds are the distinct ranks, descending, after a sentinel for (0, 0)
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), uniq.flip(0)])
    assert len(thresholds) == len(fpr), (len(thresholds), len(fpr))
    return fpr.double(), tpr.double(), thresholds


def auroc(scores: Tensor, labels: Tensor) -> float:
    scores, labels = _check(scores, labels)
    return float(binary_auroc(_unit_ranks(scores)[0], labels))


def average_precision(scores: Tensor, labels: Tensor) -> float:
    scores, labels = _check(scores, labels)
    return float(binary_average_precision(_unit_ranks(scores)[0], labels))


def youden_threshold(scores: Tensor, labels: Tensor) -> float:
    """The cut-off maximising J = sensitivity + specificity - 1 (the lowest such on ties)."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    j = tpr - fpr
    best = torch.nonzero(j == j.max()).flatten()[-1]  # last = lowest threshold among the best
    return float(thresholds[best])


def metrics_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Confusion-matrix metrics with anomalous = score >= threshold (nan where undefined)."""
    scores, labels = _check(scores, labels)
    pred = scores >= threshold
    pos = labels == 1
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    tn = int((~pred & ~pos).sum())
    fn = int((~pred & pos).sum())

    def div(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "precision": div(tp, tp + fp),
        "recall": div(tp, tp + fn),
        "accuracy": div(tp + tn, len(labels)),
    }


def evaluate(
    scores: Tensor,
    labels: Tensor,
    prefix: str,
    components: dict[str, Tensor] | None = None,
    val_threshold: float | None = None,
) -> dict[str, float]:
    """Flat metrics dict for one split, e.g. ``test/auroc``, ``test/sensitivity``,
    ``test/auroc_residual``, ``test/accuracy_at_val_threshold``.

    Empty if the split lacks one class. ``val_threshold`` (in raw score units) adds
    accuracy, sensitivity and specificity at that cut-off (the Sparse-GAN protocol).
    """
    if not has_both_classes(labels):
        return {}
    out = {
        f"{prefix}/auroc": auroc(scores, labels),
        f"{prefix}/ap": average_precision(scores, labels),
    }
    threshold = youden_threshold(scores, labels)
    out[f"{prefix}/youden_threshold"] = threshold
    for k, v in metrics_at_threshold(scores, labels, threshold).items():
        out[f"{prefix}/{k}"] = v
    if val_threshold is not None and math.isfinite(val_threshold):
        at_val = metrics_at_threshold(scores, labels, val_threshold)
        for k in ("accuracy", "sensitivity", "specificity"):
            out[f"{prefix}/{k}_at_val_threshold"] = at_val[k]
    for name, comp in (components or {}).items():
        out[f"{prefix}/auroc_{name}"] = auroc(comp, labels)
    return out
