"""Procedural SD-OCT volumes with known retinal boundaries and lesion masks (no download).

The 3-D counterpart of :mod:`anogan_lightning.data.synthetic`: the same layer table
(``_LAYERS``: RNFL bright, nuclear layers dark, plexiform layers medium, photoreceptor line
bright, RPE brightest) and the same speckle model (multiplicative Gamma(L, 1/L) noise, slightly
blurred), rendered on smooth 3-D surfaces so that neighbouring B-scans look alike.

Geometry, in fractions of the B-scan height, over the columns u and the B-scan index w (both
in [0, 1]): Bruch's membrane ``bm(u, w)`` is a tilted paraboloid, the inner limiting membrane
``ilm = bm - thickness`` with a Gaussian foveal pit. Between them the depth
t = (row - ILM) / (BM - ILM) picks the layer reflectivity, so BM is the bottom edge of the bright
RPE band (what the boundary detector looks for); above the ILM is the dark vitreous, below BM
the fading choroid. The true boundaries are returned as float rows: ILM = the first retina row,
BM = the last RPE row (pixel centres at row + 0.5).

Lesions (3-D, each with a voxel mask): ``fluid`` (dark ellipsoidal cysts in the nuclear layers),
``foci`` (bright hyperreflective dots), ``drusen`` (an RPE elevation; the raised RPE band is what
an image-based BM detector then follows, so the drusen space is the mask and ``bm`` stays the
bottom of the bright band). A diseased volume carries one or two lesion types, three to five
instances in all, so that many B-scans are affected.

Files (:func:`write_synthetic_volumes`): ``train/vol_XXX.npz`` (healthy) and
``test/vol_XXX.npz`` (every other one diseased) with arrays ``volume`` (uint8, (B-scans, rows,
columns)) and ``spacing`` (µm, same axis order), and ``test/masks/vol_XXX.npy`` (uint8 {0, 1}),
so the datamodule reads them through the same reader path as real data. Every volume is a pure
function of (seed, split, index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from anogan_lightning.data.synthetic import _LAYERS, _SPLIT_CODE, _layer_profile

VOLUME_SHAPE = (16, 128, 256)  # (B-scans, rows, columns)
# µm between B-scans, per row, per column: Spectralis-like lateral sampling (11.5 µm/column), so
# resampling to ~22 µm per column halves the width as in the AnoGAN paper (512 -> ~256 columns)
SPACING_UM = (120.0, 15.0, 11.5)
LESIONS = ("fluid", "foci", "drusen")
_RPE_TOP = _LAYERS[-1][0]  # depth t where the RPE band starts
FORMAT_VERSION = 1  # bump when the renderer changes: cached synthetic files are rewritten


@dataclass
class PhantomVolume:
    """A rendered volume: image (n, H, W) uint8, true ILM/BM rows (n, W) float, mask (n, H, W)."""

    volume: np.ndarray
    ilm: np.ndarray
    bm: np.ndarray
    mask: np.ndarray
    lesions: tuple[str, ...]


def render_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = VOLUME_SHAPE,
    lesions: tuple[str, ...] = (),
    speckle_looks: float = 4.0,
    lesion_scale: float = 1.0,
) -> PhantomVolume:
    """One volume with ``lesions`` (any of :data:`LESIONS`, repeats allowed)."""
    n, h, width = shape
    u = np.linspace(0.0, 1.0, width)[None, None, :]  # (1, 1, W)
    w = np.linspace(0.0, 1.0, n)[:, None, None] if n > 1 else np.full((1, 1, 1), 0.5)
    v = (np.arange(h)[None, :, None] + 0.5) / h  # (1, H, 1), pixel centres

    centre = rng.uniform(0.66, 0.72)
    curve, curve_z = rng.uniform(-0.15, 0.25), rng.uniform(-0.1, 0.1)
    tilt, tilt_z = rng.uniform(-0.08, 0.08), rng.uniform(-0.05, 0.05)
    thick = rng.uniform(0.26, 0.34)
    fu, fz = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.7)
    fw, fwz, fd = rng.uniform(0.06, 0.1), rng.uniform(0.15, 0.3), rng.uniform(0.3, 0.45)
    bm = centre + curve * (u - 0.5) ** 2 + curve_z * (w - 0.5) ** 2 + tilt * (u - 0.5)
    bm = bm + tilt_z * (w - 0.5)  # (n, 1, W)
    thickness = thick * (1 - fd * np.exp(-((u - fu) ** 2) / fw**2 - (w - fz) ** 2 / fwz**2))
    ilm = bm - thickness

    mask = np.zeros(shape, dtype=bool)
    s = lesion_scale
    rpe = bm  # bottom of the bright RPE band; raised by drusen
    for _ in range(lesions.count("drusen")):
        du, dz = rng.uniform(0.25, 0.75), rng.uniform(0.2, 0.8)
        dw, dwz, dh = rng.uniform(0.05, 0.09) * s, rng.uniform(0.15, 0.3), rng.uniform(0.04, 0.06)
        bump = dh * s * np.exp(-(((u - du) / dw) ** 2) - ((w - dz) / dwz) ** 2)
        new_rpe = np.minimum(rpe, bm - bump)
        mask |= (v > new_rpe) & (v <= bm) & (bump > 0.5 / h)
        rpe = new_rpe

    t = (v - ilm) / (rpe - ilm)  # depth in the retina, 1 at the bottom of the RPE band
    img = np.where(t < 0, 0.03, _layer_profile(np.clip(t, 0, 1)))
    choroid = 0.55 * np.exp(-(v - bm) / 0.12) * (1 + 0.25 * np.sin(40 * u + 9 * v))
    img = np.where(t > 1, np.clip(choroid, 0.02, 1.0), img)
    img = np.where(mask, 0.42, img)  # drusen material under the raised RPE

    for _ in range(lesions.count("fluid")):
        cu, cz, ct = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.45, 0.65)
        rx, rz, ry = (
            rng.uniform(0.06, 0.12) * s,
            rng.uniform(0.12, 0.25) * s,
            rng.uniform(0.035, 0.06) * s,
        )
        iu, iz = int(cu * (width - 1)), int(cz * (n - 1))
        cv = ilm[iz, 0, iu] + ct * (rpe[iz, 0, iu] - ilm[iz, 0, iu])
        cyst = ((u - cu) / rx) ** 2 + ((w - cz) / rz) ** 2 + ((v - cv) / ry) ** 2 <= 1
        cyst &= (t > 0.05) & (t < 0.85)
        img = np.where(cyst, 0.02, img)
        mask |= cyst
    for _ in range(lesions.count("foci")):
        r = max(1.2 / h, 0.015 * s)
        for _ in range(rng.integers(3, 6)):
            cu, cz, ct = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.5)
            iu, iz = int(cu * (width - 1)), int(cz * (n - 1))
            cv = ilm[iz, 0, iu] + ct * thickness[iz, 0, iu]
            dot = ((u - cu) * width / h) ** 2 + ((w - cz) * 0.3) ** 2 + (v - cv) ** 2 <= r**2
            img = np.where(dot, 1.0, img)
            mask |= dot

    img = gaussian_filter(img * rng.uniform(0.85, 1.1), sigma=(0, 0.7, 0.7))
    speckle = rng.gamma(speckle_looks, 1.0 / speckle_looks, size=shape)
    speckle = gaussian_filter(speckle, sigma=(0, 0.5, 0.5))
    img = img * speckle + rng.normal(0, 0.02, size=shape)
    volume = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    # float rows: pixel r covers v in [r/h, (r+1)/h); the first retina row is ceil(ilm*h - 0.5)
    ilm_rows = (ilm[:, 0, :] * h - 0.5).astype(np.float32)
    bm_rows = (rpe[:, 0, :] * h - 0.5).astype(np.float32)
    return PhantomVolume(volume, ilm_rows, bm_rows, mask.astype(np.uint8), tuple(lesions))


def volume_lesions(rng: np.random.Generator) -> tuple[str, ...]:
    """Lesion list of a diseased volume: one or two types, three to five instances."""
    kinds = list(rng.choice(LESIONS, size=int(rng.integers(1, 3)), replace=False))
    while len(kinds) < int(rng.integers(3, 6)):
        kinds.append(str(rng.choice(kinds)))
    return tuple(str(k) for k in kinds)


def make_volume(
    seed: int, split: str, index: int, diseased: bool, shape=VOLUME_SHAPE, speckle_looks=4.0
) -> PhantomVolume:
    """Volume ``index`` of ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, 7])
    lesions = volume_lesions(rng) if diseased else ()
    vol = render_volume(rng, shape, lesions, speckle_looks)
    if lesions and not vol.mask.any():  # lesions too small to occupy a voxel: render bigger
        vol = render_volume(rng, shape, lesions, speckle_looks, lesion_scale=1.5)
    return vol


def write_synthetic_volumes(
    root: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    shape: tuple[int, int, int] = VOLUME_SHAPE,
    speckle_looks: float = 4.0,
) -> Path:
    """Write the volume folders (see the module docstring) once; returns ``root``.

    A ``synthetic.json`` marker holding the arguments is written last: if it matches, the files
    are there already and nothing is rewritten (their mtimes, which key the preprocessing cache,
    stay the same).
    """
    root = Path(root)
    spec = {
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "shape": list(shape),
        "speckle_looks": speckle_looks,
        "version": FORMAT_VERSION,
    }
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test" / "masks").mkdir(parents=True, exist_ok=True)
    spacing = np.array(SPACING_UM, dtype=np.float64)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            vol = make_volume(seed, split, i, split == "test" and i % 2 == 1, shape, speckle_looks)
            np.savez(root / split / f"vol_{i:03d}.npz", volume=vol.volume, spacing=spacing)
            if split == "test":
                np.save(root / "test" / "masks" / f"vol_{i:03d}.npy", vol.mask)
    marker.write_text(json.dumps(spec))
    return root
