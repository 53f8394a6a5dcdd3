"""Image-level evaluation: AUROC, AP, ROC, Youden cut-off, threshold carried from val to test,
bootstrap confidence intervals, per-class AUROC.

Scores are raw and higher means more anomalous. torchmetrics applies a sigmoid to predictions
outside [0, 1], which saturates large raw scores (sums of residuals reach hundreds) into ties
and silently returns AUROC 0.5. So scores are first replaced by their dense ranks scaled to
[0, 1]: an order-preserving map that keeps ties, under which every rank metric is unchanged.

Confidence intervals: a stratified, seeded bootstrap over the images (normals resampled among
normals, anomalies among anomalies, so every resample keeps the split's class counts);
``N_BOOT`` resamples, percentile interval. The AUROC of a resample is computed from resampling
counts (weights) rather than from copied scores, all resamples at once: for each anomaly the
weighted count of normals scored below it (ties one half) is a cumulative sum over the sorted
normals. Scores compared on the same images (components of one run, or two runs) share the
resamples, which makes the interval of their difference a paired one.
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
    """Whether ``labels`` hold at least one normal (0) and one anomalous (1) image."""
    labels = torch.as_tensor(labels)
    return bool((labels == 0).any() and (labels == 1).any())


N_BOOT = 1000  # bootstrap resamples behind every confidence interval
CI_LEVEL = 0.95
CI_SEED = 0  # the resamples are seeded: the same scores give the same interval


def bootstrap_weights(labels: Tensor, n_boot: int = N_BOOT, seed: int = CI_SEED) -> Tensor:
    """(n_boot, N) float64 resampling counts, stratified by class: each row draws, with
    replacement, as many images of each label as the split holds."""
    labels = torch.as_tensor(labels).flatten().long().cpu()
    g = torch.Generator().manual_seed(seed)
    weights = torch.zeros(n_boot, len(labels), dtype=torch.float64)
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        draws = torch.randint(len(idx), (n_boot, len(idx)), generator=g)
        weights[:, idx] = torch.zeros(n_boot, len(idx), dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(n_boot, len(idx), dtype=torch.float64)
        )
    return weights


def weighted_aurocs(scores: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """AUROC of each score row under each row of image weights: (K, N) scores, (N,) labels,
    (B, N) weights -> (B, K). Ones as weights give the plain AUROC (ties count one half)."""
    scores = torch.as_tensor(scores).double().cpu()
    scores = scores[None] if scores.ndim == 1 else scores
    labels = torch.as_tensor(labels).flatten().long().cpu()
    weights = torch.as_tensor(weights).double().cpu()
    neg, pos = labels == 0, labels == 1
    if not (neg.any() and pos.any()):
        raise ValueError("AUROC needs both classes")
    w0_all, w1 = weights[:, neg], weights[:, pos]  # (B, N0), (B, N1)
    denom = w0_all.sum(1) * w1.sum(1)
    out = torch.empty(len(weights), len(scores), dtype=torch.float64)
    for k, s in enumerate(scores):
        s0, order = torch.sort(s[neg])
        s1 = s[pos]
        cum = torch.cat([torch.zeros(len(weights), 1, dtype=torch.float64), w0_all[:, order]], 1)
        cum = cum.cumsum(1)  # (B, N0 + 1): weight of the normals before each sorted position
        left = torch.searchsorted(s0, s1, right=False)
        right = torch.searchsorted(s0, s1, right=True)
        below = 0.5 * (cum[:, left] + cum[:, right])  # (B, N1): normals below, ties one half
        out[:, k] = (w1 * below).sum(1) / denom
    return out


def bootstrap_aurocs(
    scores: Tensor, labels: Tensor, n_boot: int = N_BOOT, seed: int = CI_SEED
) -> Tensor:
    """(n_boot, K) AUROCs of (K, N) score rows on shared stratified resamples of the images."""
    scores, labels_ = _check_rows(scores, labels)
    weights = bootstrap_weights(labels_, n_boot, seed)
    # bound the (B, N) temporaries: about 16M entries per chunk
    step = max(1, 16_000_000 // max(len(labels_), 1))
    return torch.cat([weighted_aurocs(scores, labels_, w) for w in weights.split(step)])


def percentile_interval(samples: Tensor, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap samples (percentile method)."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples.double(), q).tolist()
    return lo, hi


def auroc_ci(
    scores: Tensor, labels: Tensor, n_boot: int = N_BOOT, seed: int = CI_SEED
) -> tuple[float, float]:
    """Stratified bootstrap 95% confidence interval of the AUROC."""
    return percentile_interval(bootstrap_aurocs(scores, labels, n_boot, seed)[:, 0])


def paired_auroc_difference(
    scores_a: Tensor, scores_b: Tensor, labels: Tensor, n_boot: int = N_BOOT, seed: int = CI_SEED
) -> tuple[float, float, float]:
    """(AUROC(a) - AUROC(b), CI low, CI high) for two scorings of the same images (same order),
    from one set of stratified resamples shared by both (a paired bootstrap)."""
    stacked = torch.stack([torch.as_tensor(scores_a), torch.as_tensor(scores_b)])
    point = weighted_aurocs(*_check_rows(stacked, labels), torch.ones(1, len(labels)))[0]
    boot = bootstrap_aurocs(stacked, labels, n_boot, seed)
    low, high = percentile_interval(boot[:, 0] - boot[:, 1])
    return float(point[0] - point[1]), low, high


def pooled_paired_difference(
    pairs: list[tuple[Tensor, Tensor, Tensor]],
    same_images: bool = False,
    n_boot: int = N_BOOT,
    seed: int = CI_SEED,
) -> tuple[float, float, float]:
    """Mean over K pairs (e.g. seed k of two methods) of AUROC(a_k) - AUROC(b_k), with a
    bootstrap 95% interval over images and pairs.

    Each pair is (scores_a, scores_b, labels) on the same images in the same order. Every
    resample draws the images (stratified; one draw shared by every pair when ``same_images``,
    i.e. all pairs were scored on one test set in one order, else one draw per pair) and, when
    K > 1, the K pairs with replacement, so the interval holds both the test-set and the
    run-to-run (seed) variation of the mean difference.
    """
    if not pairs:
        raise ValueError("no pairs")
    point = sum(auroc(a, y) - auroc(b, y) for a, b, y in pairs) / len(pairs)
    if same_images:
        rows = torch.stack([torch.as_tensor(s) for a, b, _ in pairs for s in (a, b)])
        boot = bootstrap_aurocs(rows, pairs[0][2], n_boot, seed)
        diffs = boot[:, 0::2] - boot[:, 1::2]  # (B, K)
    else:
        columns = []
        for k, (a, b, y) in enumerate(pairs):
            rows = torch.stack([torch.as_tensor(a), torch.as_tensor(b)])
            boot = bootstrap_aurocs(rows, y, n_boot, seed + k)
            columns.append(boot[:, 0] - boot[:, 1])
        diffs = torch.stack(columns, 1)  # (B, K)
    if len(pairs) > 1:
        g = torch.Generator().manual_seed(seed + 1_000_003)
        pick = torch.randint(len(pairs), (n_boot, len(pairs)), generator=g)
        diffs = diffs.gather(1, pick)
    low, high = percentile_interval(diffs.mean(1))
    return float(point), low, high


def _check_rows(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).detach().double().cpu()
    scores = scores[None] if scores.ndim == 1 else scores
    rows = [_check(s, labels)[0] for s in scores]
    return torch.stack(rows), _check(scores[0], labels)[1]


def class_subsets(labels: Tensor, classes: list[str]) -> dict[str, Tensor]:
    """Disease class name -> boolean mask of the normals plus that class's images.

    Normals are the label-0 images whatever their class is called; a class is a name carried
    by label-1 images (e.g. Kermany's CNV, DME, DRUSEN)."""
    labels = torch.as_tensor(labels).flatten().long().cpu()
    if len(classes) != len(labels):
        raise ValueError(f"{len(classes)} class names for {len(labels)} labels")
    normal = labels == 0
    names = sorted({c for c, lab in zip(classes, labels.tolist(), strict=True) if lab == 1})
    out = {}
    for name in names:
        of_class = torch.tensor([c == name for c in classes]) & (labels == 1)
        out[name] = normal | of_class
    return out


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


def roc_points(
    scores: Tensor, labels: Tensor, max_points: int = 1000
) -> tuple[list[float], list[float]]:
    """(fpr, tpr) of :func:`roc_curve` thinned to at most about ``max_points`` points for a
    plot (a test set of 10^5 images has up to 10^5 + 1): the points closest to evenly spaced
    positions along the curve's length, both ends kept. Only for drawing; the AUROC is
    computed on the whole curve."""
    fpr, tpr, _ = roc_curve(scores, labels)
    if len(fpr) <= max_points:
        return fpr.tolist(), tpr.tolist()
    step = torch.sqrt(torch.diff(fpr) ** 2 + torch.diff(tpr) ** 2)
    along = torch.cat([torch.zeros(1, dtype=torch.float64), step.cumsum(0)])
    targets = torch.linspace(0, float(along[-1]), max_points, dtype=torch.float64)
    keep = torch.unique(torch.searchsorted(along, targets).clamp_max(len(fpr) - 1))
    keep = torch.unique(torch.cat([torch.tensor([0, len(fpr) - 1]), keep]))
    return fpr[keep].tolist(), tpr[keep].tolist()


def is_ci(key: str) -> bool:
    """Whether a results key is a confidence-interval bound (``..._ci_low``, ``..._ci_high``)."""
    return key.endswith(("_ci_low", "_ci_high"))


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
    classes: list[str] | None = None,
    n_boot: int = N_BOOT,
) -> dict[str, float]:
    """Flat metrics dict for one split, e.g. ``test/auroc``, ``test/sensitivity``,
    ``test/auroc_residual``, ``test/accuracy_at_val_threshold``.

    Empty if the split lacks one class. ``val_threshold`` (in raw score units) adds
    accuracy, sensitivity and specificity at that cut-off (the Sparse-GAN protocol).
    Every AUROC ``<key>`` gets its bootstrap 95% interval ``<key>_ci_low``, ``<key>_ci_high``
    (``n_boot`` resamples; 0 skips them). ``classes`` (one name per image) adds
    ``<prefix>/auroc/<class>`` for each class of the anomalous images, against all normals.
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
    if n_boot:  # one set of resamples for the score and its components
        rows = {f"{prefix}/auroc": scores}
        rows |= {f"{prefix}/auroc_{name}": comp for name, comp in (components or {}).items()}
        stacked = torch.stack([_check(v, labels)[0] for v in rows.values()])
        boot = bootstrap_aurocs(stacked, labels, n_boot)
        for key, column in zip(rows, boot.T, strict=True):
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = percentile_interval(column)
    if classes is not None:
        scores_, labels_ = _check(scores, labels)
        for name, subset in class_subsets(labels_, classes).items():
            key = f"{prefix}/auroc/{name}"
            out[key] = auroc(scores_[subset], labels_[subset])
            if n_boot:
                low, high = auroc_ci(scores_[subset], labels_[subset], n_boot)
                out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
    return out
