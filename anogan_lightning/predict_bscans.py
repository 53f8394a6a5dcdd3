"""B-scans of a retina-normalised (``resize=retina``) checkpoint in :mod:`anogan_lightning.predict`:
single B-scan files and whole OCT volumes, scored B-scan by B-scan, with their maps carried
back onto the scans and, for volumes, an en-face map.

Scoring is the test path of the training run: each B-scan is normalised by the checkpoint's
:class:`~anogan_lightning.data.bscan.preprocessing.BScanPreprocessing` (its
:class:`~anogan_lightning.data.bscan.retina_windows.RetinaBScanDataset`), every window scored,
the window scores aggregated by its ``aggregate`` rule into the B-scan score (what the
threshold was chosen on) and the window maps stitched into the band's map
(:func:`score_bscans`).

Maps on the scan. A stitched map lives on the normalised band (flattened on BM, cropped,
resampled); :meth:`~anogan_lightning.data.retina.normalize.NormalizedBScan.to_scan` carries it
back onto the scan's own pixel grid, NaN above and below the band. Columns where the retina
was not found reliably (:meth:`~anogan_lightning.data.retina.normalize.NormalizedBScan.unreliable_columns`:
an implausible ILM-BM distance, a band column mostly beyond the scan) are NaN too: a map there
is not evidence about the tissue (:func:`scan_map`).

Volumes. A volume file (``.vol``, ``.e2e``, ``.npy``, ``.npz``, multi-page ``.tif``, NIfTI)
is read whole (:func:`~anogan_lightning.data.readers.read_volume`) and its B-scans scored as
B-scan files are, with the file's own ILM and BM where the reader returns them (a Heidelberg
``.vol``'s segmentation, ``ilm``/``bm`` arrays of an ``.npz``) and detected otherwise; which
one is recorded per B-scan. The file's spacing is not used: the model's retina settings apply
as they did to its training B-scans (a Kermany JPEG has none). A B-scan where the retina is not
found gets no score and its reason. The volume's score is the highest B-scan score, anomalous
when it is >= the threshold, i.e. when any B-scan is (the threshold is a B-scan threshold:
a volume rule of one's own, e.g. k anomalous B-scans, can be read off ``bscans.csv``).

En-face map (:func:`enface_row`): per B-scan and scan column, the mean (``enface=mean``) or the
max of the band map over the retina (ILM to BM rows of the band), carried back to the scan's
columns; an (n_bscans, W) image, the view an ophthalmologist reads of where the anomalies lie,
NaN for unscored B-scans and unreliable columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing
from anogan_lightning.data.bscan.retina_windows import RetinaBScanDataset
from anogan_lightning.data.readers import Volume
from anogan_lightning.data.retina.normalize import NormalizedBScan, _weighted_back
from anogan_lightning.evaluation import stitch

ENFACE_REDUCTIONS = ("mean", "max")
VOLUME_RULE = "max B-scan score >= threshold"


@dataclass
class ScoredBScans:
    """Per-B-scan scores of a dataset's B-scans (index as in ``ds`` after preload)."""

    ds: RetinaBScanDataset
    score: np.ndarray  # (n,) float64
    components: dict[str, np.ndarray]
    windows: np.ndarray  # (n,) int64 windows per B-scan
    maps: np.ndarray | None  # (n, H, W) stitched band maps, restricted to the map region


def score_bscans(
    model, ds: RetinaBScanDataset, prep: BScanPreprocessing, batch_size: int, device
) -> ScoredBScans:
    """Every window of ``ds``'s B-scans (preloaded) scored in batches, aggregated per B-scan by
    the checkpoint's rule (:func:`~anogan_lightning.evaluation.stitch.window_to_bscan`, as the
    B-scans of the training run's test split), window maps stitched."""
    names = list(model.components)
    n = len(ds.image_ids)
    stitcher = stitch.Stitcher(ds.image_shapes)
    scores, comps, index = [], {k: [] for k in names}, []
    for batch in DataLoader(ds, batch_size=batch_size):
        with torch.inference_mode(not model.needs_grad_at_test):
            res = model.score({"x": batch["x"].to(device), "id": batch["id"]})
        scores.append(res["score"].detach().float().cpu())
        for k in names:
            comps[k].append(res[k].detach().float().cpu())
        index.append(batch["coords"][:, 0])
        if "amap" in res:
            stitcher.add(res["amap"].detach().float().cpu(), batch["coords"])
    maps = ds.restrict_maps(stitcher.maps()) if int(stitcher.count.sum()) else None
    image_index = torch.cat(index)
    b = stitch.window_to_bscan(
        torch.cat(scores),
        {k: torch.cat(v) for k, v in comps.items()},
        image_index,
        n,
        prep.aggregate,
        prep.top_k,
        maps,
        ds.image_retina,
    )
    if b.error is not None:
        raise ValueError(b.error)
    return ScoredBScans(
        ds,
        b.score.double().numpy(),
        {k: v.double().numpy() for k, v in b.components.items() if k in names},
        np.bincount(image_index.numpy(), minlength=n).astype(np.int64),
        maps,
    )


def scan_map(
    scored: ScoredBScans, i: int, geometry: NormalizedBScan
) -> tuple[np.ndarray, np.ndarray]:
    """B-scan ``i``'s map on its scan's pixel grid (H, W) float32, NaN outside the band and in
    unreliable columns, and those columns (W,) bool."""
    m = scored.ds.scan_map(i, scored.maps[i], geometry)
    bad = geometry.unreliable_columns()
    m[:, bad] = np.nan
    return m, bad


def enface_row(
    scored: ScoredBScans, i: int, geometry: NormalizedBScan, reduce: str = "mean"
) -> np.ndarray:
    """(W,) float32: B-scan ``i``'s band map reduced over the retina (its ILM to BM rows in the
    band) per band column, carried back to the scan's columns; NaN in unreliable columns."""
    if reduce not in ENFACE_REDUCTIONS:
        raise ValueError(f"enface={reduce!r}; expected one of {ENFACE_REDUCTIONS}")
    h, w = (int(v) for v in scored.ds.image_shapes[i])
    band = scored.maps[i][:h, :w].astype(np.float32)
    retina = scored.ds.image_retina(i)
    left = (w - geometry.band.shape[1]) // 2  # pad_width's symmetric padding of narrow bands
    sl = slice(left, left + geometry.band.shape[1])
    band, retina = band[:, sl], retina[:, sl]
    inside = retina & np.isfinite(band)
    with np.errstate(invalid="ignore"):
        if reduce == "mean":
            row = np.where(inside, band, 0.0).sum(0) / np.maximum(inside.sum(0), 1)
        else:
            row = np.where(inside, band, -np.inf).max(0)
    row = np.where(inside.any(0), row, np.nan).astype(np.float32)
    if geometry.col_matrix is not None:
        row = _weighted_back(row[None], geometry.col_matrix, axis=1)[0]
    row[geometry.unreliable_columns()] = np.nan
    return row


def volume_boundaries(vol: Volume) -> tuple[list, str]:
    """Per B-scan (ILM, BM) rows from the file, or None per B-scan to detect them; and the
    source, ``"file"`` or ``"detected"``. A B-scan without a segmented column is detected."""
    n = vol.data.shape[0]
    if not vol.layers:
        return [None] * n, "detected"
    ilm, bm = vol.layers["ilm"], vol.layers["bm"]
    out = [
        (ilm[b], bm[b]) if np.isfinite(ilm[b]).any() and np.isfinite(bm[b]).any() else None
        for b in range(n)
    ]
    return out, "file"


def volume_dataset(vol: Volume, prep: BScanPreprocessing) -> tuple[RetinaBScanDataset, str]:
    """The volume's B-scans as a prediction dataset (every window), named
    ``<file>:b<index>``, with the file's boundaries where it has them; preloaded (B-scans where
    the retina is not found are left out: ``ds.failures``)."""
    n = vol.data.shape[0]
    names = [Path(f"{vol.path}:b{b:03d}") for b in range(n)]
    bounds, source = volume_boundaries(vol)
    ds = RetinaBScanDataset(
        names,
        [0] * n,
        [""] * n,
        prep,
        "grid",
        None,
        None,
        images=[vol.data[b] for b in range(n)],
        boundaries=bounds,
        keep_geometry=True,
    )
    ds.preload(vol.path.name)
    return ds, source


class NoBScanScored(ValueError):
    """A volume none of whose B-scans passed the retina checks."""


def score_volume(
    vol: Volume, model, prep: BScanPreprocessing, batch_size: int, device
) -> tuple[ScoredBScans, str]:
    """A read volume's B-scans normalised (:func:`volume_dataset`) and scored
    (:func:`score_bscans`): (scored, boundary source). NoBScanScored, with the count and the
    first reason, if no B-scan could be normalised."""
    ds, source = volume_dataset(vol, prep)
    if not ds.image_ids:
        n = vol.data.shape[0]
        raise NoBScanScored(
            f"no B-scan could be normalised ({len(ds.failures)} of {n}; first: {ds.failures[0]})"
        )
    return score_bscans(model, ds, prep, batch_size, device), source


def enface_map(scored: ScoredBScans, shape: tuple[int, ...], reduce: str = "mean") -> np.ndarray:
    """The en-face map of a scored volume of ``shape`` (B-scans, rows, columns): (B-scans,
    columns) float32 of :func:`enface_row`, NaN for B-scans not scored."""
    out = np.full((shape[0], shape[2]), np.nan, dtype=np.float32)
    for i, name in enumerate(scored.ds.image_ids):
        out[bscan_index(name)] = enface_row(scored, i, scored.ds.geometry(i), reduce)
    return out


def bscan_index(name: str) -> int:
    """The B-scan index of a ``<file>:b<index>`` name."""
    return int(str(name).rsplit(":b", 1)[1])
