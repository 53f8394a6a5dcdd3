"""Site calibration (anogan_lightning.calibration): the threshold from a site's normal scans and
the batch-norm statistics re-estimated on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from anogan_lightning.calibration import adapt_batch_norm, rates_at, threshold_at_specificity


@pytest.mark.parametrize("n", [20, 50, 333])
@pytest.mark.parametrize("spec", [0.8, 0.95, 0.99])
def test_threshold_keeps_the_target_share_of_normals_below(n: int, spec: float):
    scores = np.random.default_rng(n).normal(size=n)
    t = threshold_at_specificity(scores, spec)
    below = float((scores < t).mean())
    assert below >= spec and below - spec < 1 / n + 1e-9  # no more normals flagged than asked
    assert not np.isin(t, scores)  # the cut does not sit on a calibration scan's score


def test_threshold_generalises_to_other_normals_of_the_site():
    """On fresh normals from the same distribution the specificity reached scatters around
    the target by about sqrt(s (1 - s) / n)."""
    rng = np.random.default_rng(0)
    reached = []
    for _ in range(200):
        t = threshold_at_specificity(rng.gamma(2.0, size=50), 0.95)
        reached.append(rates_at(rng.gamma(2.0, size=2000), np.zeros(2000), t)["specificity"])
    assert abs(np.mean(reached) - 0.95) < 0.02
    assert 0.01 < np.std(reached) < 0.05


def test_threshold_edge_cases_and_errors():
    assert threshold_at_specificity([1.0, 2.0, 3.0], 0.99) > 3.0  # every normal below
    assert threshold_at_specificity([5.0], 0.5) > 5.0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="specificity"):
            threshold_at_specificity([1.0, 2.0], bad)
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_at_specificity([], 0.9)
    with pytest.raises(ValueError, match="not finite"):
        threshold_at_specificity([1.0, float("nan")], 0.9)


def test_rates_at_threshold():
    r = rates_at(np.array([0.1, 0.2, 0.9, 0.5]), np.array([0, 0, 1, 1]), 0.5)
    assert r == {"specificity": 1.0, "sensitivity": 1.0}
    assert np.isnan(rates_at(np.array([0.1]), np.array([0]), 0.5)["sensitivity"])


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.unused = nn.BatchNorm2d(4)


def test_adapt_batch_norm_touches_only_the_layers_the_score_uses():
    torch.manual_seed(0)
    net = _Two().eval()
    before_unused = net.unused.running_mean.clone()
    weights = net.used[0].weight.clone()
    site = [torch.randn(8, 1, 6, 6) * 3 + 2 for _ in range(4)]
    assert adapt_batch_norm(net, net.used, site) == 4
    with torch.no_grad():
        feats = torch.cat([net.used[0](x) for x in site])
    torch.testing.assert_close(net.used[1].running_mean, feats.mean((0, 2, 3)), atol=1e-4, rtol=0)
    assert torch.equal(net.unused.running_mean, before_unused)
    assert torch.equal(net.used[0].weight, weights) and not net.training
    assert net.used[1].momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        adapt_batch_norm(net, net.used, [])
