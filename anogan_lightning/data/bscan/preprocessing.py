"""How a B-scan file becomes model input: one object for training, test and prediction.

:class:`BScanPreprocessing` holds every setting that decides what a model sees of a B-scan and
how its window scores make the B-scan's score. The data modules build it from their config
(:meth:`BScanPreprocessing.from_data_config`) and build their datasets through it; the
checkpoint stores it (:meth:`~BScanPreprocessing.to_dict`), and ``anogan_lightning.predict``
rebuilds it (:func:`preprocessing_from_checkpoint`) and builds its datasets through the same
methods, so new scans are prepared by the very code that prepared the test scans.

Resize policies (``resize``):

- ``"retina"`` (the configs' default): each B-scan normalised on its retina
  (:class:`~anogan_lightning.data.retina.normalize.RetinaNorm`, ``retina``) and scored whole as
  ``image_size`` windows ``window_stride`` apart, their scores aggregated per B-scan
  (``aggregate``, ``top_k``), their maps stitched and kept inside ``map_region``
  (:class:`~anogan_lightning.data.bscan.retina_windows.RetinaBScanDataset`). It carries to
  other devices and beats the crop on Kermany's own test for every method
  (experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md).
- ``"crop"``: height resize + square crop, the papers' whole-image protocol; ``"squash"`` leaks
  the scan width (:mod:`~anogan_lightning.data.bscan.crop`). ``crop_flatten`` flattens each scan
  on its Bruch's membrane first.

``fill_white`` sets registration fill (the white wedges of rotated scans) to the background in
either policy (with ``resize="retina"`` through ``retina.fill_white``, which a config's
``fill_white`` sets unless its ``retina`` keys do).

The defaults are ``conf/data/bscan_folder.yaml``'s (``conf/data/kermany.yaml`` inherits them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from torch.utils.data import Dataset

from anogan_lightning.data.bscan.crop import CropBScanDataset
from anogan_lightning.data.bscan.retina_windows import RetinaBScanDataset
from anogan_lightning.data.bscan.windows import AGGREGATIONS, MAP_REGIONS
from anogan_lightning.data.retina.normalize import RetinaNorm

RESIZES = ("retina", "crop", "squash")


@dataclass(frozen=True)
class BScanPreprocessing:
    """What a model sees of a B-scan file and how a B-scan's windows score it; see the module
    docstring. Invalid values raise ValueError naming the setting."""

    image_size: int = 64
    resize: str = "retina"
    retina: RetinaNorm = field(default_factory=RetinaNorm)
    crop_flatten: bool = False  # resize=crop/squash: flatten on Bruch's membrane first
    fill_white: bool = True
    window_stride: int | None = 32  # resize=retina: val/test stride (None: image_size // 2)
    aggregate: str = "topk"
    top_k: int = 3
    map_region: str = "retina"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("resize", self.resize, RESIZES),
            ("aggregate", self.aggregate, AGGREGATIONS),
            ("map_region", self.map_region, MAP_REGIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")
        if self.image_size < 1 or self.top_k < 1:
            raise ValueError(f"image_size={self.image_size} and top_k={self.top_k} must be >= 1")
        if self.window_stride is not None and self.window_stride < 1:
            raise ValueError(f"window_stride={self.window_stride} must be >= 1 (or null)")
        if not isinstance(self.retina, RetinaNorm):
            raise ValueError(f"retina={self.retina!r}: a RetinaNorm (from_dict takes a dict)")
        if self.resize == "retina" and self.retina.height < self.image_size:
            raise ValueError(
                f"retina.height={self.retina.height} < image_size={self.image_size}: the "
                "normalised band must hold a window"
            )

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every setting as JSON-safe values (the checkpoint's record); :meth:`from_dict`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["retina"] = self.retina.key()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BScanPreprocessing:
        """The inverse of :meth:`to_dict`; an unknown key is an error naming it."""
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"preprocessing: unknown key(s) {sorted(unknown)}")
        if "retina" in d:
            d["retina"] = RetinaNorm.from_dict(d["retina"])
        return cls(**d)

    @classmethod
    def from_data_config(cls, data: dict) -> BScanPreprocessing:
        """From a data config's keys (``data=bscan_folder`` / ``data=kermany``; the other keys
        are the data module's). A key it lacks takes the default, except ``resize``: a data
        config without it is of a module that makes its own square images (``data=synthetic``),
        whose models score a file as one whole image, ``resize="crop"``. ``retina.fill_white``
        follows ``fill_white`` unless the ``retina`` keys set it."""
        names = {f.name for f in fields(cls)} - {"retina"}
        d = {k: data[k] for k in names if k in data}
        d.setdefault("resize", "crop")
        fill_white = d.get("fill_white", cls.fill_white)
        d["retina"] = RetinaNorm.from_dict({"fill_white": fill_white, **(data.get("retina") or {})})
        return cls(**d)

    # -- datasets ------------------------------------------------------------------------------
    def train_dataset(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        masks: Sequence[Path | None] | None,
        crop: str,
        cache_dir: str | Path | None,
    ) -> Dataset:
        """Training items: one window (retina) or crop per B-scan and item, at ``crop``
        ("random": drawn from torch's RNG, or "center")."""
        if self.resize == "retina":
            return RetinaBScanDataset(paths, labels, classes, self, crop, masks, cache_dir)
        return CropBScanDataset(paths, labels, classes, self, crop)

    def eval_dataset(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        masks: Sequence[Path | None] | None,
        cache_dir: str | Path | None,
        keep_geometry: bool = False,
    ) -> Dataset:
        """Val/test/prediction items: every window of each B-scan (retina; aggregated per
        B-scan by the evaluator) or its centre crop. ``keep_geometry``: retina datasets keep
        each band's geometry (prediction draws the maps on the scans)."""
        if self.resize == "retina":
            return RetinaBScanDataset(
                paths, labels, classes, self, "grid", masks, cache_dir, keep_geometry=keep_geometry
            )
        return CropBScanDataset(paths, labels, classes, self, "center")


def preprocessing_from_checkpoint(meta: dict) -> BScanPreprocessing:
    """The preprocessing a checkpoint's model was trained with: its ``preprocessing`` record
    (``BScanPreprocessing.to_dict()`` of the training data module) when it has one, else
    rebuilt from its data config (``meta["data"]``). ``meta``: the checkpoint's
    ``"anogan_lightning"`` entry, or an exported model's sidecar."""
    if meta.get("preprocessing"):
        return BScanPreprocessing.from_dict(meta["preprocessing"])
    return BScanPreprocessing.from_data_config(meta.get("data") or {})
