"""What the evaluation reads from a val/test dataset, beyond its items.

Every val/test dataset yields items ``x``, ``label``, ``id`` (and ``mask``, ``cls``; the package's
batch contract, :class:`~anogan_lightning.data.base.AnomalyDataModule`) and has a length. Two
kinds of datasets tell the evaluation more, and say so by having these members (checked with
``isinstance`` against the runtime-checkable protocols below; no class has to inherit them):

- :class:`StitchedImages`: items are patches of larger images (the volume patches of
  :class:`~anogan_lightning.data.patch_dataset.PatchDataset`) or windows of whole B-scans;
  each item carries ``coords`` (3,) = (image index, y, x) of its top-left pixel, and the
  evaluation stitches the item maps back into the images (:class:`~.stitch.Stitcher`) for the
  pixel metrics and the overlays, where the dataset has masks or windows.
- :class:`WindowedBScans`: items are the windows of whole B-scans (the ``resize=retina`` grid),
  scored one by one and turned into one score per B-scan by the dataset's ``aggregate`` rule
  (:func:`~.stitch.window_to_bscan`); the labels, ids and classes of the results are those of
  the B-scans. It also gives the B-scans' retina (``map_retina``, the map region) and the
  anatomy reference score (``thickness``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class StitchedImages(Protocol):
    """A dataset of patches of larger images, each item with ``coords`` (image, y, x)."""

    #: whether some images have lesion masks (then the stitched maps get pixel metrics)
    has_mask: bool

    @property
    def image_ids(self) -> list[str]:
        """One name per image, e.g. ``"<volume file>:b<B-scan>"`` or the B-scan's file."""
        ...

    @property
    def image_shapes(self) -> np.ndarray:
        """(n_images, 2) int64 rows and columns of each image (the stitching layout)."""
        ...

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` (h, w) float32 in [-1, 1], for the overlays."""
        ...

    def image_mask(self, i: int) -> np.ndarray | None:
        """(h, w) uint8 lesion mask of image ``i`` (nonzero = lesion), or None."""
        ...


@runtime_checkable
class WindowedBScans(StitchedImages, Protocol):
    """Windows of whole B-scans, aggregated into one score per B-scan.

    A dataset of this shape that is not a window grid (training windows) says so with
    ``aggregate = None``.
    """

    #: the window -> B-scan rule: ``max``, ``mean``, ``topk`` or ``map_retina``; None: the
    #: items are not a window grid (not aggregated)
    aggregate: str | None
    #: ``topk``: the number of highest windows averaged
    top_k: int

    @property
    def image_labels(self) -> torch.Tensor:
        """(n_images,) int64 label of each B-scan (0 normal, 1 anomalous)."""
        ...

    @property
    def window_counts(self) -> np.ndarray:
        """(n_images,) int64: how many windows (items) each B-scan has. A B-scan whose windows
        were not all scored (a batch limit) is left out of the metrics, and counted."""
        ...

    def image_retina(self, i: int) -> np.ndarray:
        """(h, w) bool: the retina (ILM to BM) of B-scan ``i``, in its image's coordinates."""
        ...

    def restrict_maps(self, maps: np.ndarray) -> np.ndarray:
        """Stitched maps (n_images, H, W) restricted to the dataset's map region (e.g. 0
        outside the retina); NaN (uncovered) kept."""
        ...

    def thickness_scores(self) -> torch.Tensor:
        """(n_images,) float64 anatomy reference score per B-scan (not learned), reported as
        ``<split>/auroc_thickness`` beside every method's scores."""
        ...


def windowed(ds: object) -> bool:
    """Whether ``ds`` is a grid of B-scan windows to aggregate (:class:`WindowedBScans` with an
    ``aggregate`` rule)."""
    return isinstance(ds, WindowedBScans) and ds.aggregate is not None


def stitched(ds: object) -> bool:
    """Whether the item maps of ``ds`` are stitched back into its images: patches of images
    with masks, or windows of B-scans."""
    return isinstance(ds, StitchedImages) and (ds.has_mask or windowed(ds))
