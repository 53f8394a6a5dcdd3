"""Windows over a 2-D band and the rules that turn window scores into a B-scan score."""

from __future__ import annotations

import numpy as np

#: window scores -> B-scan score: the max, the mean, the mean of the ``top_k`` highest, or
#: ``map_retina``: the mean of the stitched map over the retina
AGGREGATIONS = ("max", "mean", "topk", "map_retina")
#: ``map_region`` values: where a stitched anomaly map may be non-zero. "retina": from the ILM to
#: Bruch's membrane (every lesion the maps are for, fluid, drusen, CNV, lies between them; the
#: band's margins of vitreous and choroid only add speckle and shadows), "band": everywhere
MAP_REGIONS = ("retina", "band")


def window_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Window starts (int64) covering ``length``, ``stride`` apart, the last flush with the end
    (full coverage); [0] when one window fits. The B-scan windows and the volume patch grid."""
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return np.array(starts, dtype=np.int64)
