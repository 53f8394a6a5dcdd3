"""OCT volume and annotation-mask readers: Heidelberg ``.vol``/``.e2e``, NumPy, TIFF, NIfTI.

Every reader returns a :class:`Volume`: ``data`` (B-scans, rows, columns) in the file's dtype,
plus the voxel spacing in µm along those axes where the file carries it (``None`` where not).

- ``.vol`` (Heidelberg Spectralis raw export) and ``.e2e`` (Heidelberg Eye Explorer) through
  eyepy, the field's reader; intensities as eyepy displays them (uint8, Heyex's log-like
  contrast). ``.vol`` carries the spacing in its header (``scale_x``, ``scale_y``, ``distance``,
  mm) and the device's own layer segmentation, of which ILM and BM are kept as the volume's
  layers. eyepy reports ``.e2e`` volumes in pixels (the scale is not in any field it decodes), so
  their spacing is ``None`` and comes from the config. Only the first OCT series of an
  ``.e2e`` is read.
- ``.npy``: a 3-D array (a 2-D array is one B-scan); no spacing.
- ``.npz``: the array ``volume`` (or ``mask`` for masks, or the only array in the file) and an
  optional ``spacing`` array of three floats (µm, same axis order); optional ``ilm`` and ``bm``
  arrays (B-scans, columns) of boundary rows (NaN where unsegmented) are the volume's layers.
- ``.tif``/``.tiff``: one page per B-scan (tifffile). Spacing from ImageJ metadata (``unit``
  micron/µm/um/mm/cm/nm, ``XResolution``/``YResolution`` in pixels per unit, ``spacing`` between
  slices) or from the TIFF ``ResolutionUnit`` (inch, cm, mm, µm); resolution unit "none" means
  no spacing.
- ``.nii``/``.nii.gz``: nibabel; array axes (i, j, k) = (column, row, B-scan), as ITK/SimpleITK
  write a (B-scan, row, column) array, transposed here; spacing from the header zooms in its
  spatial unit (mm, µm or m; "unknown" means no spacing).

Masks (:func:`read_mask`) come in the same formats except ``.vol``/``.e2e``; any non-zero voxel
is a lesion (multi-class fluid labels, e.g. IRF/SRF/PED = 1/2/3, count alike). A mask must have
the volume's shape. Every error names the file. eyepy, nibabel and tifffile are the
``volumes`` extra: a format whose reader is missing stops with
:class:`~anogan_lightning.extras.MissingExtraError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anogan_lightning.extras import MissingExtraError, require

VOLUME_SUFFIXES = (".vol", ".e2e", ".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz")
MASK_SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz")
Spacing = tuple[float | None, float | None, float | None]  # µm between B-scans, rows, columns

_UNIT_UM = {  # µm per unit
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "\\u00b5m": 1.0,  # ImageJ writes the micro sign escaped
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "nm": 1e-3,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
}
_TIFF_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # INCH, CENTIMETER, MILLIMETER, MICROMETER


class VolumeReadError(ValueError):
    """A volume or mask file that cannot be used; the message names the file."""


@dataclass
class Volume:
    """``data`` (B-scans, rows, columns) and spacing in µm along those axes (None = unknown);
    ``layers``: boundary rows the file carries, ``"ilm"`` and ``"bm"`` (B-scans, columns) float,
    NaN where a column is unsegmented (empty when the file has none)."""

    data: np.ndarray
    spacing: Spacing
    path: Path
    layers: dict[str, np.ndarray] = field(default_factory=dict)


def suffix(path: str | Path) -> str:
    """The format suffix, lower case; ``.nii.gz`` counts as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem(path: str | Path) -> str:
    """File name without its format suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    return name[: len(name) - len(suffix(path))]


def is_volume_file(path: str | Path) -> bool:
    return suffix(path) in VOLUME_SUFFIXES and Path(path).is_file()


def _as_3d(a: np.ndarray, path: Path, what: str) -> np.ndarray:
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise VolumeReadError(
            f"{path}: expected a 3-D {what} (B-scans, rows, columns), got shape {a.shape}"
        )
    return a


def _spacing(values, scale: float = 1.0) -> Spacing:
    out = []
    for v in values:
        v = None if v is None else float(v) * scale
        out.append(v if v is not None and np.isfinite(v) and v > 0 else None)
    return tuple(out)  # type: ignore[return-value]


LAYER_KEYS = ("ilm", "bm")


def _read_npz(path: Path, key: str) -> tuple[np.ndarray, Spacing]:
    with np.load(path) as z:
        arrays = [k for k in z.files if k != "spacing" and k not in LAYER_KEYS]
        if key in z.files:
            name = key
        elif len(arrays) == 1:
            name = arrays[0]
        else:
            raise VolumeReadError(
                f"{path}: no array named {key!r} and {len(arrays)} candidates {arrays}; "
                f"store the {key} as {key}=..."
            )
        a = z[name]
        spacing: Spacing = (None, None, None)
        if "spacing" in z.files:
            s = np.asarray(z["spacing"], dtype=np.float64).ravel()
            if s.shape != (3,):
                raise VolumeReadError(f"{path}: 'spacing' must hold 3 values (µm), got {s}")
            spacing = _spacing(s)
    return a, spacing


def _read_tiff(path: Path) -> tuple[np.ndarray, Spacing]:
    tifffile = require("tifffile", f"reading {suffix(path)}")

    with tifffile.TiffFile(path) as tf:
        a = tf.asarray()
        page = tf.pages[0]
        xres, yres = page.get_resolution()
        ij = tf.imagej_metadata or {}
        unit = str(ij.get("unit", "")).strip().lower()
        if unit in _UNIT_UM:
            um = _UNIT_UM[unit]
            z = ij.get("spacing")
            return a, _spacing([None if z is None else z * um, um / yres, um / xres])
        um = _TIFF_RESUNIT_UM.get(int(page.resolutionunit))
        if um is None:
            return a, (None, None, None)
        return a, _spacing([None, um / yres, um / xres])


def _read_nifti(path: Path) -> tuple[np.ndarray, Spacing]:
    nib = require("nibabel", f"reading {suffix(path)}")

    img = nib.load(str(path))
    a = np.asarray(img.dataobj)
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D NIfTI image, got shape {a.shape}")
    a = np.ascontiguousarray(a.transpose(2, 1, 0))  # (i, j, k) -> (B-scan, row, column)
    unit = img.header.get_xyzt_units()[0]
    um = _UNIT_UM.get(unit)
    if um is None:
        return a, (None, None, None)
    zx, zy, zz = (float(v) for v in img.header.get_zooms()[:3])
    return a, _spacing([zz, zy, zx], um)


def _read_heyex(path: Path, kind: str) -> tuple[np.ndarray, Spacing, dict[str, np.ndarray]]:
    eyepy_io = require("eyepy.io", f"reading {kind}")
    ev = eyepy_io.import_heyex_vol(path) if kind == ".vol" else eyepy_io.import_heyex_e2e(path)
    data = np.asarray(ev.data)
    meta = ev.meta
    layers = {}
    for name in ("ILM", "BM"):  # the device's segmentation, where the export has it
        layer = ev.layers.get(name) if hasattr(ev, "layers") else None
        if layer is not None:
            layers[name.lower()] = np.asarray(layer.data, dtype=np.float64)
    if str(meta.get("scale_unit", "")).lower() == "mm":
        return data, _spacing([meta["scale_z"], meta["scale_y"], meta["scale_x"]], 1e3), layers
    return data, (None, None, None), layers


def _layers(raw: dict[str, np.ndarray], shape: tuple[int, ...], path: Path) -> dict:
    """ILM and BM of a volume of ``shape``, both or neither: rows outside the frame or not
    finite (Heyex marks unsegmented columns with huge values) become NaN; a layer of another
    shape is an error naming the file."""
    if not all(k in raw for k in LAYER_KEYS):
        return {}
    out = {}
    for k in LAYER_KEYS:
        a = np.array(raw[k], dtype=np.float64)
        if a.shape != (shape[0], shape[2]):
            raise VolumeReadError(
                f"{path}: layer {k!r} has shape {a.shape}; expected (B-scans, columns) = "
                f"{(shape[0], shape[2])}"
            )
        a[~np.isfinite(a) | (a < 0) | (a > shape[1] - 1)] = np.nan
        out[k] = a
    return out


def _format(path: Path, allowed: tuple[str, ...], what: str) -> str:
    """``path``'s suffix, or a VolumeReadError naming the file when it is not in ``allowed``."""
    kind = suffix(path)
    if kind not in allowed:
        raise VolumeReadError(
            f"{path}: unknown {what} format {kind or '(no suffix)'!r}; "
            f"expected one of {', '.join(allowed)}"
        )
    return kind


def read_volume(path: str | Path) -> Volume:
    """Read one OCT volume (see the module docstring for the formats)."""
    path = Path(path)
    kind = _format(path, VOLUME_SUFFIXES, "volume")
    if not path.is_file():
        raise VolumeReadError(f"{path}: no such volume file")
    layers: dict[str, np.ndarray] = {}
    try:
        if kind == ".npy":
            a, spacing = np.load(path, allow_pickle=False), (None, None, None)
        elif kind == ".npz":
            a, spacing = _read_npz(path, "volume")
            with np.load(path) as z:
                layers = {k: z[k] for k in LAYER_KEYS if k in z.files}
        elif kind in (".tif", ".tiff"):
            a, spacing = _read_tiff(path)
        elif kind in (".nii", ".nii.gz"):
            a, spacing = _read_nifti(path)
        else:
            a, spacing, layers = _read_heyex(path, kind)
    except (VolumeReadError, MissingExtraError):
        raise
    except Exception as e:  # a decoder's own error, re-raised naming the file
        raise VolumeReadError(f"{path}: cannot read {kind} volume: {e}") from e
    a = _as_3d(np.asarray(a), path, "volume")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise VolumeReadError(f"{path}: volume dtype {a.dtype} is not numeric")
    if min(a.shape) < 1:
        raise VolumeReadError(f"{path}: empty volume of shape {a.shape}")
    return Volume(a, spacing, path, _layers(layers, a.shape, path))


def read_mask(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Annotation mask as uint8 {0, 1} (B-scans, rows, columns); ``shape``: the volume's."""
    path = Path(path)
    kind = _format(path, MASK_SUFFIXES, "mask")
    try:
        if kind == ".npy":
            a = np.load(path, allow_pickle=False)
        elif kind == ".npz":
            a, _ = _read_npz(path, "mask")
        elif kind in (".tif", ".tiff"):
            a, _ = _read_tiff(path)
        else:
            a, _ = _read_nifti(path)
    except (VolumeReadError, MissingExtraError):
        raise
    except Exception as e:
        raise VolumeReadError(f"{path}: cannot read {kind} mask: {e}") from e
    a = _as_3d(np.asarray(a), path, "mask")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise VolumeReadError(
            f"{path}: mask shape {tuple(a.shape)} does not match its volume's {tuple(shape)}"
        )
    return (a != 0).astype(np.uint8)


def resolve_spacing_x(volume: Volume, fallback_um: float | None) -> float:
    """Column spacing in µm: the file's, else ``fallback_um``; an error naming the file if
    neither is known."""
    sx = volume.spacing[2]
    if sx is not None:
        return sx
    if fallback_um is not None and fallback_um > 0:
        return float(fallback_um)
    raise VolumeReadError(
        f"{volume.path}: the file carries no voxel spacing; set data.spacing_x_um (µm per "
        "column, e.g. 11.5 for a 512-column Spectralis scan over 6 mm) or "
        "data.target_spacing_x_um=null to keep the columns as they are"
    )
