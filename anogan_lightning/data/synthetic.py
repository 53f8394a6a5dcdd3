"""Procedural OCT B-scans with planted lesions: the built-in default data (no download).

A B-scan is rendered directly at ``image_size``. Geometry: a curved, tilted retina with a foveal
pit, between the inner limiting membrane (ILM, top) and the retinal pigment epithelium (RPE,
bottom), over a dark vitreous and a fading choroid. Inside, the depth coordinate
t = (row - ILM) / (RPE - ILM) picks a reflectivity from a layer table (RNFL bright, nuclear
layers dark, plexiform layers medium, photoreceptor line bright, RPE brightest). Speckle is
multiplicative Gamma(L, 1/L) noise, spatially correlated by a small blur, as in real OCT; its
grain is set for a 256-row scan (``speckle_looks`` looks there) and averaged down to the render
size, as resizing a real B-scan averages its speckle.

Position, tilt, curvature, thickness and the foveal pit vary per scan; ``shape_variability``
scales those ranges (1 = the default demo setting, 2 = twice as wide and clearly harder for
every method: with more shape variation normal anatomy itself is harder to reproduce).

Lesions (label 1), each with a pixel mask:
- ``fluid``: a dark intraretinal cyst (ellipse in the nuclear layers);
- ``foci``: a few bright hyperreflective dots in the inner retina;
- ``drusen``: an RPE elevation, the space under the raised RPE filled with medium reflectivity.
An anomalous image carries one or two of them; its class name (``cls``, for the per-class
AUROC) names them, e.g. ``fluid`` or ``fluid+drusen``; a normal image's is ``normal``. ``lesion_scale`` scales their size (1 = the
default, clearly visible setting: cysts and elevations of large DME/drusen size; smaller is
harder). The lesion parameters come from their own random stream, so the same scan can be
rendered with and without its lesion.

Every image is a pure function of (seed, split, index): deterministic, independent of the
number of images asked for, and fast (~0.1 ms per 64x64 image).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from anogan_lightning.data.base import AnomalyDataModule, ArrayDataset

log = logging.getLogger(__name__)

LESIONS = ("fluid", "foci", "drusen")
# (upper edge of the layer in depth t, reflectivity), top to bottom
_LAYERS = (
    (0.00, 0.80),  # RNFL
    (0.10, 0.45),  # GCL
    (0.24, 0.58),  # IPL
    (0.34, 0.32),  # INL
    (0.46, 0.55),  # OPL
    (0.54, 0.28),  # ONL
    (0.80, 0.72),  # ELM / IS-OS line
    (0.87, 0.34),  # outer segments
    (0.91, 0.97),  # RPE
)
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
NATIVE_ROWS = 256  # speckle grain is set at this resolution; smaller renders average it down


def _layer_profile(t: np.ndarray) -> np.ndarray:
    edges = np.array([e for e, _ in _LAYERS])
    values = np.array([v for _, v in _LAYERS])
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(values) - 1)
    return values[idx]


def render_bscan(
    rng: np.random.Generator,
    size: int,
    lesions: tuple[str, ...] = (),
    lesion_scale: float = 1.0,
    speckle_looks: float = 4.0,
    shape_variability: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One B-scan: (image (S, S) float32 in [0, 1], lesion mask (S, S) uint8)."""
    u = np.linspace(0.0, 1.0, size)[None, :]  # columns, (1, S)
    v = (np.arange(size)[:, None] + 0.5) / size  # rows, top = 0, (S, 1)

    # geometry, in fractions of the image height; each range is centre ± half-width·variability
    def jitter(mid: float, half: float) -> float:
        return mid + half * shape_variability * rng.uniform(-1, 1)

    centre = jitter(0.55, 0.02)
    curve = jitter(0.05, 0.075)
    tilt = jitter(0.0, 0.03)
    thick = jitter(0.31, 0.02)
    fovea_u, fovea_w, fovea_d = jitter(0.5, 0.05), jitter(0.09, 0.01), jitter(0.45, 0.06)
    rpe = centre + curve * (u - 0.5) ** 2 + tilt * (u - 0.5) + thick / 2  # Bruch's membrane, (1, S)
    thickness = thick * (1 - fovea_d * np.exp(-(((u - fovea_u) / fovea_w) ** 2)))
    ilm = rpe - thickness
    bruch = rpe.copy()

    mask = np.zeros((size, size), dtype=bool)
    s = lesion_scale
    # lesion parameters come from their own stream, so a scan with and without a lesion share
    # geometry and speckle (the same scan, before and after the disease)
    base_rng, rng = rng, np.random.default_rng(rng.integers(1 << 62))
    if "drusen" in lesions:
        du, dw, dh = (
            rng.uniform(0.25, 0.75),
            rng.uniform(0.09, 0.16) * s,
            rng.uniform(0.10, 0.16) * s,
        )
        bump = dh * np.exp(-(((u - du) / dw) ** 2))
        rpe = rpe - bump  # the RPE rises; the retina above it is compressed
        mask |= (v >= rpe + 0.04) & (v < bruch) & (bump > 0.5 / size)

    t = (v - ilm) / (rpe + 0.04 - ilm)  # depth in the retina, RPE band ends at t = 1
    img = np.where(t < 0, 0.03, _layer_profile(np.clip(t, 0, 1)))
    below = v >= rpe + 0.04
    choroid = 0.55 * np.exp(-(v - bruch) / 0.12) * (1 + 0.25 * np.sin(40 * u + 9 * v))
    img = np.where(below, np.clip(choroid, 0.02, 1.0), img)
    if "drusen" in lesions:
        img = np.where(mask, 0.42, img)  # material under the raised RPE

    if "fluid" in lesions:
        cu, ct = rng.uniform(0.25, 0.75), rng.uniform(0.45, 0.7)
        rx, ry = rng.uniform(0.13, 0.22) * s, rng.uniform(0.07, 0.12) * s
        cv = ilm + ct * (rpe - ilm)  # (1, S): the row of depth ct in every column
        cv_at = np.take_along_axis(cv, np.array([[int(cu * (size - 1))]]), axis=1)
        cyst = ((u - cu) / rx) ** 2 + ((v - cv_at) / ry) ** 2 <= 1
        cyst &= (t > 0.05) & (t < 0.9)
        img = np.where(cyst, 0.02, img)
        mask |= cyst
    if "foci" in lesions:
        r = max(1.0 / size, 0.025 * s)
        for _ in range(rng.integers(3, 7)):
            fu, ft = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.55)
            fv = ilm[0, int(fu * (size - 1))] + ft * thickness[0, int(fu * (size - 1))]
            dot = (u - fu) ** 2 + (v - fv) ** 2 <= r**2
            img = np.where(dot, 1.0, img)
            mask |= dot

    rng = base_rng
    img = gaussian_filter(img * rng.uniform(0.92, 1.06), sigma=0.35 * size / 64)
    # speckle of a scan NATIVE_ROWS high, averaged down to `size` rows: more looks per pixel
    looks = speckle_looks * max(1.0, NATIVE_ROWS / size)
    speckle = rng.gamma(looks, 1.0 / looks, size=(size, size))
    speckle = gaussian_filter(speckle, sigma=0.5) / gaussian_filter(np.ones_like(speckle), 0.5)
    img = img * speckle + rng.normal(0, 0.02, size=(size, size))
    return np.clip(img, 0, 1).astype(np.float32), mask.astype(np.uint8)


def make_split(
    n: int,
    size: int,
    split: str,
    seed: int = 0,
    anomaly_fraction: float = 0.5,
    lesion_scale: float = 1.0,
    speckle_looks: float = 4.0,
    shape_variability: float = 1.0,
) -> ArrayDataset:
    """``n`` B-scans of one split. train: normal only; val/test: anomalous with prob. fraction."""
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.zeros((n, 1, size, size), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    classes = []
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        lesions: tuple[str, ...] = ()
        if split != "train" and rng.random() < anomaly_fraction:
            k = rng.integers(1, 3)
            lesions = tuple(rng.choice(LESIONS, size=k, replace=False))
        img, m = render_bscan(rng, size, lesions, lesion_scale, speckle_looks, shape_variability)
        if lesions and not m.any():  # a lesion too small to occupy a pixel: re-render bigger
            img, m = render_bscan(
                rng, size, lesions, lesion_scale * 1.5, speckle_looks, shape_variability
            )
        images[i, 0] = img * 2 - 1
        masks[i, 0] = m
        labels[i] = int(m.any())
        classes.append("+".join(k for k in LESIONS if k in lesions) if m.any() else "normal")
    ids = [f"synthetic/{split}/{i:06d}" for i in range(n)]
    return ArrayDataset(
        torch.from_numpy(images), torch.from_numpy(labels), ids, torch.from_numpy(masks), classes
    )


class SyntheticOCTDataModule(AnomalyDataModule):
    """Procedural OCT B-scans: train = normal only, val/test = normal + planted lesions."""

    def __init__(
        self,
        n_train: int = 2048,
        n_val: int = 256,
        n_test: int = 512,
        anomaly_fraction: float = 0.5,
        lesion_scale: float = 1.0,
        speckle_looks: float = 4.0,
        shape_variability: float = 1.0,
        seed: int = 0,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        self.kw = dict(
            seed=seed,
            anomaly_fraction=anomaly_fraction,
            lesion_scale=lesion_scale,
            speckle_looks=speckle_looks,
            shape_variability=shape_variability,
        )

    def setup(self, stage: str | None = None) -> None:
        for split, n in self.n.items():
            if getattr(self, f"{split}_set") is None:
                ds = make_split(n, self.image_size, split, **self.kw)
                setattr(self, f"{split}_set", ds)
