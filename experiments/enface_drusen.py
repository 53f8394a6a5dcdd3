"""En-face anomaly maps of a real drusen volume against its drusen footprint (issue 25).

    python experiments/enface_drusen.py <run>/checkpoints/model.ckpt [...] [--out DIR]

Each checkpoint (a retina B-scan model, e.g. trained on kermany-mini normals) scores
``../shared/data/spectralis-volume/volume.tif`` B-scan by B-scan exactly as ``predict`` does
(:func:`anogan_lightning.predict_bscans.score_volume`;
the TIFF has no segmentation, so ILM/BM are detected), and its en-face map is formed with both
reductions over the retina (``mean`` and ``max``, :func:`~anogan_lightning.predict_bscans.enface_map`).

Ground truth: ``layers.npz`` holds the expert RPE and Bruch's membrane rows per column (NaN where
unmarked). Drusen lift the RPE off BM, so a column is in the drusen footprint when
``(bm - rpe) * 3.87 µm >= --min-um`` (default 40 µm; BM lies ~7.6 rows = 29 µm below the RPE
line on average, so 40 µm is a clear elevation). Only columns with both boundaries marked and a
finite en-face value count. Reported per checkpoint and reduction: the en-face AUROC of the
footprint, with a 95% bootstrap CI over B-scans (columns of a B-scan are not independent), the
same at 60 µm, and the rank correlation of the B-scan scores with each B-scan's footprint
share (all but one B-scan of this volume have some footprint, so a B-scan-level AUROC has one
negative), and the ceiling of a map of limited column resolution: the footprint blurred along the
columns (Gaussian, sigma 16/32/64 scan columns) scored against itself. (The models' maps are
smoothed with sigma 8 band columns, 64 scan columns at the Kermany ``x_scale`` 0.125.) ``--out`` gets ``enface_<k>.npy`` per checkpoint and ``enface_drusen.png``: the
mean en-face map over checkpoints beside the footprint. Prints ``key=value`` lines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from anogan_lightning.data.readers import read_volume
from anogan_lightning.evaluation.metrics import auroc
from anogan_lightning.predict import image_preprocessing, load_checkpoint
from anogan_lightning.predict_bscans import (
    ENFACE_REDUCTIONS,
    bscan_index,
    enface_map,
    score_volume,
)

SHARED = Path(__file__).resolve().parents[2] / "shared/data/spectralis-volume"
ROW_UM = 3.87


def footprint(layers: Path, min_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(marked, drusen): (n_bscans, W) bool, both boundaries marked / RPE lifted >= min_um."""
    z = np.load(layers)
    rpe, bm = z["rpe"].astype(np.float64), z["bm"].astype(np.float64)
    marked = np.isfinite(rpe) & np.isfinite(bm)
    with np.errstate(invalid="ignore"):
        drusen = marked & ((bm - rpe) * ROW_UM >= min_um)
    return marked, drusen


def enface_maps(ckpt: Path, volume: Path) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """{reduction: (n, W) en-face map}, (n,) B-scan scores (NaN unscored), seconds."""
    t0 = time.perf_counter()
    device = torch.device("cpu")
    model, meta = load_checkpoint(ckpt, device)
    prep = image_preprocessing(model, meta)
    vol = read_volume(volume)
    scored, _ = score_volume(vol, model, prep, 32, device)
    maps = {r: enface_map(scored, vol.data.shape, r) for r in ENFACE_REDUCTIONS}
    scores = np.full(vol.data.shape[0], np.nan)
    for i, name in enumerate(scored.ds.image_ids):
        scores[bscan_index(name)] = scored.score[i]
    return maps, scores, time.perf_counter() - t0


def roc_auc_score(truth: np.ndarray, values: np.ndarray) -> float:
    return auroc(torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(truth).long())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (no tie correction: scores and shares are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc_ci(
    values: np.ndarray, truth: np.ndarray, valid: np.ndarray, n_boot: int, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC of ``values`` for ``truth`` over ``valid`` cells, and a 95% CI from resampling
    B-scans (rows) with replacement."""
    auc = float(roc_auc_score(truth[valid], values[valid]))
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(valid.any(1))
    boot = []
    for _ in range(n_boot):
        pick = rng.choice(rows, len(rows))
        t, v = truth[pick][valid[pick]], values[pick][valid[pick]]
        if t.any() and not t.all():
            boot.append(roc_auc_score(t, v))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return auc, float(lo), float(hi)


def figure(path: Path, mean_map: np.ndarray, drusen: np.ndarray, marked: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    # B-scans ~42 µm apart, columns 11.18 µm: aspect = row spacing / column spacing
    aspect = 42.0 / 11.18
    im = ax[0].imshow(mean_map, cmap="inferno", aspect=aspect, interpolation="nearest")
    ax[0].set_title("en-face anomaly map (mean of the models)")
    fig.colorbar(im, ax=ax[0], shrink=0.8)
    truth = np.where(marked, drusen.astype(float), np.nan)
    gray = plt.get_cmap("gray").copy()
    gray.set_bad("tab:blue")
    ax[1].imshow(truth, cmap=gray, aspect=aspect, interpolation="nearest")
    ax[1].set_title("drusen footprint: RPE >= 40 µm above BM (blue: unmarked)", fontsize=10)
    for a in ax:
        a.set_xlabel("column")
        a.set_ylabel("B-scan")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpts", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--min-um", type=float, default=40.0)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    marked, drusen = footprint(args.data / "layers.npz", args.min_um)
    _, drusen60 = footprint(args.data / "layers.npz", 60.0)
    print(f"marked_columns={int(marked.sum())}")
    print(f"footprint_columns={int(drusen.sum())}")
    print(f"footprint_share={drusen.sum() / marked.sum():.3f}")
    has = drusen.any(1)
    print(f"bscans_with_footprint={int(has.sum())} of {len(has)}")
    # the ceiling a map of limited column resolution can reach: the footprint itself, blurred
    # along the columns by a Gaussian of sigma columns, scored against the footprint
    for sigma in (16, 32, 64):
        blurred = gaussian_filter1d(drusen.astype(float), sigma, axis=1)
        print(f"ceiling_sigma{sigma}_auroc={roc_auc_score(drusen[marked], blurred[marked]):.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    means = []
    for k, ckpt in enumerate(args.ckpts):
        maps, scores, secs = enface_maps(ckpt, args.data / "volume.tif")
        tag = f"{ckpt.parents[1].name}" if ckpt.parent.name == "checkpoints" else ckpt.stem
        print(f"{tag}.seconds={secs:.1f}")
        print(f"{tag}.bscans_scored={int(np.isfinite(scores).sum())}")
        for r, m in maps.items():
            valid = marked & np.isfinite(m)
            auc, lo, hi = auroc_ci(m, drusen, valid, args.boot)
            auc60 = roc_auc_score(drusen60[valid], m[valid])
            print(f"{tag}.{r}.columns={int(valid.sum())}")
            print(f"{tag}.{r}.enface_auroc={auc:.4f} [{lo:.3f}, {hi:.3f}]")
            print(f"{tag}.{r}.enface_auroc_60um={auc60:.4f}")
        ok = np.isfinite(scores)
        share = drusen.sum(1) / np.maximum(marked.sum(1), 1)
        print(f"{tag}.bscan_spearman={spearman(scores[ok], share[ok]):.3f}")
        if args.out:
            np.save(args.out / f"enface_{k}_{tag}.npy", maps["mean"])
        # each model's map to ranks in [0, 1] before averaging (their score scales differ)
        m = maps["mean"]
        fin = np.isfinite(m)
        ranked = np.full_like(m, np.nan)
        ranked[fin] = np.argsort(np.argsort(m[fin])) / max(fin.sum() - 1, 1)
        means.append(ranked)
    if args.out:
        mean_map = np.nanmean(np.stack(means), 0)
        figure(args.out / "enface_drusen.png", mean_map, drusen, marked)
        print(f"figure={args.out / 'enface_drusen.png'}")


if __name__ == "__main__":
    main()
