"""Retina normalisation of one B-scan on one core, and the min-cost path against skimage.graph.

1. :func:`anogan_lightning.data.retina.normalize.normalize_bscan` (ILM/BM detection with its checks,
   flattening, the anatomy band, resample to 64 rows and half the columns, percentile
   normalisation) on a 496x768 B-scan: a real Duke DME scan from ``../shared/data`` when it is
   there, else a phantom of that size. CPU ms per scan, pinned to one core with one BLAS thread
   (target <= 50 ms); also the 49 B-scans of the Spectralis volume (496x512) with their mean
   Bruch's-membrane error against the manual boundary, when that folder is there.
2. :func:`~anogan_lightning.data.retina.segment.min_cost_path` vs ``skimage.graph.MCP`` with
   column-advancing offsets on the same 496x768 random cost image (no jump penalty, which MCP
   cannot express): ms each and whether the path costs agree.

``python benchmarks/preprocess.py [--repeats 20]``; prints ``key=value`` lines.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS: one thread = one core's time

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from anogan_lightning.data.retina.normalize import RetinaNorm, normalize_bscan  # noqa: E402
from anogan_lightning.data.retina.segment import detect_retina, min_cost_path  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
DUKE = SHARED / "duke-dme-fluid/images/subject01_bscan05.png"
SPECTRALIS = SHARED / "spectralis-volume"


def phantom(h: int = 496, w: int = 768) -> np.ndarray:
    rng = np.random.default_rng(0)
    u = np.linspace(-1, 1, w)
    bm = 300 + 40 * u + 30 * u**2
    ilm = bm - 110 + 45 * np.exp(-((u / 0.15) ** 2))
    r = np.arange(h)[:, None]
    img = np.where((r >= ilm) & (r < bm), 100.0, 20.0)
    img = np.where((r >= bm - 14) & (r < bm), 230, np.where(r >= bm, 70, img))
    return np.clip(img * rng.gamma(6, 1 / 6, size=img.shape), 0, 255).astype(np.uint8)


def cpu_ms(fn, repeats: int) -> float:
    fn()  # warm caches (resample matrices)
    c0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - c0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    print(f"load_average_1min={os.getloadavg()[0]:.1f}")

    s = RetinaNorm(x_scale=0.5)  # half the columns, as this benchmark has always timed
    img = np.asarray(Image.open(DUKE).convert("L")) if DUKE.is_file() else phantom()
    print(f"bscan={'duke' if DUKE.is_file() else 'phantom'}_{img.shape[0]}x{img.shape[1]}")
    band = normalize_bscan(img, s).band
    print(f"band_shape={band.shape[0]}x{band.shape[1]}")
    print(
        f"normalize_bscan_ms_per_core={cpu_ms(lambda: normalize_bscan(img, s), args.repeats):.1f}"
    )
    print(f"detect_retina_ms_per_core={cpu_ms(lambda: detect_retina(img, s), args.repeats):.1f}")

    if SPECTRALIS.is_dir():
        from anogan_lightning.data.readers import read_volume

        vol = read_volume(SPECTRALIS / "volume.tif").data
        gt = np.load(SPECTRALIS / "layers.npz")["bm"]
        sv = RetinaNorm(spacing_y_um=3.87, spacing_x_um=11.18, target_spacing_x_um=11.18)
        c0 = time.process_time()
        bms = [normalize_bscan(b, sv).bm_in for b in vol]
        ms = (time.process_time() - c0) / len(vol) * 1e3
        e = np.abs(np.stack(bms) - gt)
        e = e[~np.isnan(e)]
        print(f"spectralis_normalize_ms_per_core={ms:.1f}")
        print(f"spectralis_bm_error_rows_mean={e.mean():.2f}")
        print(f"spectralis_bm_error_rows_p95={np.percentile(e, 95):.1f}")

    from skimage.graph import MCP

    cost = np.random.default_rng(0).random((496, 768)).astype(np.float32)
    h, w = cost.shape
    ours = min_cost_path(cost, 3, 0.0)

    def skimage_path() -> np.ndarray:
        m = MCP(cost.astype(np.float64), offsets=[(d, 1) for d in range(-3, 4)])
        ends = [(i, w - 1) for i in range(h)]
        cum, _ = m.find_costs([(i, 0) for i in range(h)], ends, find_all_ends=True)
        return np.array([p[0] for p in m.traceback(min(ends, key=lambda e: cum[e]))])

    theirs = skimage_path()
    cols = np.arange(w)
    same = np.isclose(cost[ours, cols].sum(), cost[theirs, cols].sum(), rtol=1e-5)
    print(f"min_cost_path_ms={cpu_ms(lambda: min_cost_path(cost, 3, 0.0), 3):.1f}")
    print(f"skimage_mcp_ms={cpu_ms(skimage_path, 1):.1f}")
    print(f"paths_equal_cost={bool(same)}")


if __name__ == "__main__":
    main()
