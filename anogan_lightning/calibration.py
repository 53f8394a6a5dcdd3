"""Site calibration: a trained model adapted to a new clinic's scanner from its *normal* scans.

A model's decision threshold is chosen on the validation split of its training data (Youden's
J). On another device the same model can rank scans well and still flag most normal scans,
because the scores of that device's normals sit higher. A site has no labelled disease scans to
calibrate on, but it always has normal ones; this module sets the threshold from them:

- :func:`threshold_at_specificity`: the cut-off that leaves the requested fraction of the
  site's normal scores below it (decision rule ``score >= threshold``, as everywhere in the
  package). With n normals the specificity reached on *other* normals of the site scatters
  around the target by about sqrt(s (1 - s) / n) (0.03 for s = 0.95, n = 50).
- :func:`adapt_batch_norm` (optional, ``adabn``): the batch-norm running statistics of the
  layers the score runs through, re-estimated on the site's normals (AdaBN, Li et al. 2016),
  for a site whose intensity statistics differ from training.
- :meth:`~anogan_lightning.methods.base.AnomalyModule.fit_map_norm` (optional,
  ``map_norm``): the residual normaliser of the ``zscore`` / ``dark_z`` maps re-fitted on them.

The command that writes a site-calibrated checkpoint from these is
:mod:`anogan_lightning.calibrate` (``anogan-lightning calibrate``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from anogan_lightning.nets.dcgan import recalibrate_batch_norm

DEFAULT_SPECIFICITY = 0.95


def threshold_at_specificity(scores: np.ndarray | Tensor, specificity: float) -> float:
    """The threshold t with ``score >= t`` anomalous that keeps ceil(specificity * n) of the n
    normal ``scores`` below it: the midpoint between the k-th and (k+1)-th smallest score (k =
    that count), so the cut does not sit on a calibration scan's own score; above the largest
    score (by its spacing to the next, or 1e-12 relative) when k = n.

    ValueError for a specificity outside (0, 1), no finite score, or NaN among the scores.
    """
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity={specificity} must lie strictly between 0 and 1")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if len(s) == 0:
        raise ValueError("no normal scores to calibrate on")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} of {len(s)} normal scores are not finite")
    k = math.ceil(specificity * len(s) - 1e-9)  # normals that must stay below the threshold
    if k >= len(s):
        gap = s[-1] - s[-2] if len(s) > 1 and s[-1] > s[-2] else abs(s[-1]) * 1e-12 + 1e-12
        return float(s[-1] + gap / 2)
    return float((s[k - 1] + s[k]) / 2) if k > 0 else float(s[0])


def rates_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Specificity (normals, label 0, below the threshold) and sensitivity (label 1 at or
    above it) at ``threshold``; NaN for a class that is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    flagged = scores >= threshold
    normal, anomalous = labels == 0, labels == 1
    spec = float((~flagged[normal]).mean()) if normal.any() else math.nan
    sens = float(flagged[anomalous].mean()) if anomalous.any() else math.nan
    return {"specificity": spec, "sensitivity": sens}


def adapt_batch_norm(
    model: nn.Module, forward: Callable[[Tensor], object], batches: Iterable[Tensor]
) -> int:
    """AdaBN: set the running statistics of the batch norms that ``forward`` runs through to
    their cumulative average over ``batches`` (each (B, C, H, W) on the model's device);
    returns the number of batches used.

    Only the batch norms that ``forward`` calls are touched (found with forward hooks on the
    first batch): a discriminator the score does not use keeps its statistics. Those layers run
    in train mode without gradients, every other module in eval mode; parameters, momenta and
    the model's mode are restored (:func:`~anogan_lightning.nets.dcgan.recalibrate_batch_norm`).
    With no batches nothing changes and it is an error.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("adapt_batch_norm: no batches of normal scans")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    used: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, *_: used.append(m)) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(first)  # which layers the score runs through
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return recalibrate_batch_norm(
        model, itertools.chain([first], batches), forward, list(dict.fromkeys(used))
    )
