"""Every figure of the package: the run's ROC, score histograms, samples and anomaly maps, the
stitched B-scan overlays, predict's heatmaps (images and volumes) and the report's plots.

The one module that imports matplotlib (Agg: files only, no display). Figures are drawn from
records and arrays the other modules computed; nothing here computes a metric the results
report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from anogan_lightning.evaluation import metrics  # noqa: E402
from anogan_lightning.evaluation.pixel import as_numpy  # noqa: E402

#: a B-scan file's suffixes, dropped from overlay names (scan.png -> bscan_00_scan.png)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def safe_name(name: str) -> str:
    """``name`` as a file name: every character but letters, digits and ``-_.`` as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def close(fig: plt.Figure) -> None:
    """Free a figure returned by a ``plot_*`` function (after the loggers took it)."""
    plt.close(fig)


# -- a run's figures (train.py) ----------------------------------------------------------------


def _all_scores(record: dict) -> dict[str, torch.Tensor]:
    """The score, its components and the references (``thickness``) of a record."""
    return {"score": record["score"], **record["components"], **record.get("references", {})}


def plot_roc(path: Path, record: dict, title: str = "") -> plt.Figure:
    """Test ROC of the anomaly score with every component's ROC overlaid (AnoGAN Fig. 4b)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = record["labels"]
    references = record.get("references", {})
    for name, s in _all_scores(record).items():
        fpr, tpr, _ = metrics.roc_curve(s, labels)
        auc = metrics.auroc(s, labels)
        style = {"lw": 2 if name == "score" else 1, "ls": "--" if name in references else "-"}
        kind = " reference" if name in references else ""
        ax.plot(fpr, tpr, **style, label=f"{name}{kind} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "test ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_score_hist(path: Path, record: dict, title: str = "") -> plt.Figure:
    """Score distributions of normal vs anomalous test images, one panel per score
    (AnoGAN Fig. 4c, d for the residual and discrimination scores)."""
    scores = _all_scores(record)
    labels = record["labels"]
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items(), strict=True):
        bins = torch.linspace(float(s.min()), float(s.max()) + 1e-9, 31).numpy()
        ax.hist(s[labels == 0].numpy(), bins=bins, alpha=0.6, label="normal", density=True)
        ax.hist(s[labels == 1].numpy(), bins=bins, alpha=0.6, label="anomalous", density=True)
        ax.set(title=name, xlabel="score")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_samples(path: Path, samples: list[dict], title: str = "") -> plt.Figure:
    """Rows: query, generated / reconstructed image, anomaly map (mask contour where known).

    Columns: normal test images, then anomalous ones.
    """
    rows = [("query", "x"), ("generated", "x_hat"), ("anomaly map", "amap")]
    rows = [r for r in rows if all(r[1] in s for s in samples)]
    n = len(samples)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    amax = max((float(s["amap"].max()) for s in samples if "amap" in s), default=1.0)
    for j, s in enumerate(samples):
        for i, (name, key) in enumerate(rows):
            ax = axes[i][j]
            img = s[key][0].numpy()
            if key == "amap":
                ax.imshow(img, cmap="inferno", vmin=0, vmax=amax)
            else:
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            if "mask" in s and s["mask"].any() and key != "x_hat":
                ax.contour(s["mask"][0].numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0][j].set_title(s.get("title", ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def plot_anomaly_map(path: Path, sample: dict, vmax: float, title: str = "") -> plt.Figure:
    """One test image side by side: input, reconstruction, |difference|, anomaly map over the
    B-scan (Sparse-GAN Fig. 3 layout); the lesion mask is outlined in cyan where known."""
    panels = [("input", sample["x"][0].numpy(), "gray")]
    if "x_hat" in sample:
        x_hat = sample["x_hat"][0].numpy()
        panels.append(("reconstruction", x_hat, "gray"))
        panels.append(("|difference|", abs(panels[0][1] - x_hat), "inferno"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9))
    for ax, (name, img, cmap) in zip(axes, panels, strict=False):
        vmin, vmax_ = (-1, 1) if cmap == "gray" else (0, 2)
        ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax_)
        ax.set_title(name, fontsize=8)
    ax = axes[-1]
    ax.imshow(panels[0][1], cmap="gray", vmin=-1, vmax=1)
    if "amap" in sample:
        ax.imshow(sample["amap"][0].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
    ax.set_title("anomaly map", fontsize=8)
    for ax in axes:
        if "mask" in sample and sample["mask"].any():
            ax.contour(sample["mask"][0].numpy(), levels=[0.5], colors="cyan", linewidths=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    label = ("normal", "anomalous")[sample["label"]]
    fig.suptitle(f"{title}\n{sample['id']}  ({label}, score {sample['score']:.4g})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def write_anomaly_maps(out_dir: Path, record: dict, title: str = "") -> list[Path]:
    """``anomaly_maps/highest_<k>.png`` and ``lowest_<k>.png``: the test images with the
    highest and lowest scores, each with one colour scale so the maps compare."""
    extremes = [("highest", s) for s in record.get("highest", [])]
    extremes += [("lowest", s) for s in record.get("lowest", [])]
    if not extremes:
        return []
    folder = out_dir / "anomaly_maps"
    folder.mkdir(exist_ok=True)
    vmax = max((float(s["amap"].max()) for _, s in extremes if "amap" in s), default=1.0)
    paths = []
    for rank, (kind, sample) in enumerate(extremes):
        k = rank if kind == "highest" else rank - len(record.get("highest", []))
        path = folder / f"{kind}_{k + 1}.png"
        plt.close(plot_anomaly_map(path, sample, vmax or 1.0, title))
        paths.append(path)
    return paths


def write_figures(out_dir: Path, record: dict, title: str = "") -> dict[str, plt.Figure]:
    """roc.png, score_hist.png, samples.png, anomaly_maps/ from a test record; returns the
    summary figures (for loggers)."""
    samples = record["samples"]
    figs = {}
    if metrics.has_both_classes(record["labels"]):
        figs["roc"] = plot_roc(out_dir / "roc.png", record, title)
        figs["score_hist"] = plot_score_hist(out_dir / "score_hist.png", record, title)
    if samples:
        figs["samples"] = plot_samples(out_dir / "samples.png", samples, title)
    write_anomaly_maps(out_dir, record, title)
    pixel = record.get("pixel")
    if pixel is not None:  # stitched B-scans of OCT volumes with their masks
        write_overlays(
            out_dir / "bscans", pixel["maps"], pixel["masks"], pixel["image"], pixel["ids"], n=8
        )
    return figs


# -- stitched B-scans -------------------------------------------------------------------------
def save_overlay(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    vmax: float | None = None,
    title: str = "",
    shade: np.ndarray | None = None,
) -> Path:
    """PNG of one B-scan: left the image with the lesion mask outlined (cyan), right the same
    with the anomaly map as a translucent heat map (inferno, 0..``vmax``; uncovered pixels
    clear). image (H, W) in [-1, 1]; amap (H, W), NaN where not scored; ``shade`` (W,) bool:
    columns hatched in grey on the map side (where the retina was not found reliably)."""
    image, amap = as_numpy(image), as_numpy(amap).astype(np.float32)
    h, w = image.shape
    if amap.shape != (h, w):
        raise ValueError(f"anomaly map {amap.shape} does not match the image {image.shape}")
    vmax = vmax if vmax is not None else float(np.nanmax(amap)) if np.isfinite(amap).any() else 1.0
    fig = Figure(figsize=(2 * max(w / 100, 2.5), max(h / 100, 1.2) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, overlay in zip(axes, (False, True), strict=True):
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        if overlay:
            ax.imshow(
                np.ma.masked_invalid(amap),
                cmap="inferno",
                vmin=0,
                vmax=vmax,
                alpha=0.55,
                interpolation="nearest",
            )
            if shade is not None and np.any(shade):
                for a, b in _runs(np.asarray(shade, bool)):
                    ax.axvspan(a - 0.5, b - 0.5, color="0.6", alpha=0.35, hatch="//", lw=0)
        if mask is not None and np.any(mask):
            ax.contour(as_numpy(mask).astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("B-scan, lesion mask" if mask is not None else "B-scan", fontsize=7)
    axes[1].set_title(f"anomaly map (0..{vmax:.3g})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool array."""
    d = np.diff(np.r_[0, flags.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


def save_enface(path: str | Path, enface: np.ndarray, spacing, title: str = "") -> Path:
    """PNG of a volume's en-face anomaly map (B-scans x columns; NaN: not scored, grey),
    inferno from 0 to its 99th percentile, B-scan 0 at the top. ``spacing`` (µm between
    B-scans, rows, columns; None where unknown) sets the aspect so the map has the fundus's
    proportions when both lateral spacings are known."""
    e = np.asarray(enface, dtype=np.float32)
    finite = e[np.isfinite(e)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    n, w = e.shape
    dz, _, dx = spacing if spacing is not None else (None, None, None)
    aspect = dz / dx if dz and dx else max(1.0, 0.5 * w / max(n, 1))
    fig = Figure(figsize=(6.4, 6.4 * min(2.0, n * aspect / w) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_facecolor("0.5")
    im = ax.imshow(
        np.ma.masked_invalid(e),
        cmap="inferno",
        vmin=0,
        vmax=max(vmax, 1e-12),
        aspect=aspect,
        interpolation="nearest",
    )
    ax.set_xlabel("column (temporal-nasal as stored)", fontsize=7)
    ax.set_ylabel("B-scan", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_overlays(
    out_dir: str | Path,
    maps: np.ndarray,
    masks: np.ndarray,
    image: Callable[[int], np.ndarray],
    ids: list[str],
    n: int = 8,
) -> list[Path]:
    """Up to ``n`` overlay PNGs ``bscan_<k>_<id>.png``: the B-scans with the largest lesion area
    first (half of them), then healthy ones, on one colour scale (the 99th percentile of all
    covered scores).

    Args:
        maps, masks: (n_images, H, W) stitched maps and zero-padded masks (:func:`~anogan_lightning.evaluation.stitch.pad_stack`).
        image: B-scan index -> its image (h, w) in [-1, 1]; called only for the B-scans drawn.
        ids: one name per B-scan, e.g. ``"<volume file>:b<B-scan>"``.
    """
    maps, masks = as_numpy(maps), as_numpy(masks)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    sick = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0][: (n + 1) // 2]
    well = [i for i in range(len(masks)) if area[i] == 0][: n - len(sick)]
    if not sick and len(maps):  # no masks (whole-scan windows): highest and lowest map peaks
        peak = np.nan_to_num(np.nanmax(maps.reshape(len(maps), -1), axis=1), nan=-np.inf)
        order = [int(i) for i in np.argsort(-peak, kind="stable")]
        well = list(dict.fromkeys(order[: (n + 1) // 2] + order[::-1][: n // 2]))
    covered = maps[~np.isnan(maps)]
    vmax = float(np.percentile(covered, 99)) if covered.size else 1.0
    paths = []
    for k, i in enumerate(sick + well):
        img = image(i)
        h, w = img.shape
        name = Path(ids[i]).name  # a B-scan file's own suffix dropped: scan.png -> scan
        name = Path(name).stem if Path(name).suffix.lower() in _IMAGE_SUFFIXES else name
        out = Path(out_dir) / f"bscan_{k:02d}_{safe_name(name)}.png"
        paths.append(save_overlay(out, img, maps[i, :h, :w], masks[i, :h, :w], vmax, ids[i]))
    return paths


# -- predict.py ----------------------------------------------------------------------------------
def save_heatmap(path: Path, x: np.ndarray | torch.Tensor, amap, title: str) -> None:
    """PNG of one scored scan: the input, and the input under its anomaly map (jet, scaled to
    the map's own range). x, amap: (1, H, W) or (H, W); x in [-1, 1]."""
    x, amap = as_numpy(x), as_numpy(amap)
    x, amap = (x[0] if x.ndim == 3 else x), (amap[0] if amap.ndim == 3 else amap)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(x, cmap="gray", vmin=-1, vmax=1)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(x, cmap="gray", vmin=-1, vmax=1)
    axes[1].imshow(amap, cmap="jet", alpha=0.45)
    axes[1].set_title("anomaly map", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_volume_heatmaps(
    folder: Path,
    maps: np.ndarray | None,
    image: Callable[[int], np.ndarray],
    rows: list[dict],
    n: int | None,
    title: str,
) -> dict[int, Path]:
    """``bscan_<i>.png`` for the ``n`` highest-scoring B-scans of a volume (None: all): the
    flattened B-scan and its stitched map, on one colour scale per volume (the 99th percentile
    of its map); returns B-scan index -> PNG.

    Args:
        maps: (n_bscans, H, W) stitched maps (NaN: uncovered), or None: no heatmap.
        image: B-scan index -> its flattened band (h, w) in [-1, 1].
        rows: one per B-scan with ``bscan``, ``score`` (NaN: no patch) and ``anomalous``
            (None, 0 or 1), as ``predict_volume.bscan_rows`` gives them.
    """
    if maps is None:
        return {}
    scored = [r for r in rows if not math.isnan(r["score"])]
    scored.sort(key=lambda r: -r["score"])  # stable: ties in B-scan order
    covered = maps[~np.isnan(maps)]
    vmax = float(np.percentile(covered, 99)) if covered.size else 1.0
    out = {}
    for r in scored[:n] if n is not None else scored:
        b = r["bscan"]
        img = image(b)
        h, w = img.shape
        flag = {None: "", 0: " (normal)", 1: " (anomalous)"}[r["anomalous"]]
        out[b] = save_overlay(
            folder / f"bscan_{b:03d}.png",
            img,
            maps[b, :h, :w],
            vmax=vmax,
            title=f"{title}  B-scan {b}: score {r['score']:.4g}{flag}",
        )
    return out


# -- report.py -----------------------------------------------------------------------------------
def plot_roc_overlay(
    path: Path, curves: Sequence[tuple[str, torch.Tensor, torch.Tensor]], title: str
) -> None:
    """Several test ROCs in one plot: ``curves`` of (label, scores, labels), each labelled
    with its AUROC; those without both classes are left out."""
    fig, ax = plt.subplots(figsize=(6, 6))
    for label, scores, labels in curves:
        if not metrics.has_both_classes(labels):
            continue
        fpr, tpr, _ = metrics.roc_curve(scores, labels)
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({metrics.auroc(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_distributions(
    path: Path, panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]]
) -> None:
    """Normal vs anomalous score histograms, one panel per (title, scores, labels)."""
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, scores, labels) in zip(axes.flat, panels, strict=False):
        bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-9, 31).numpy()
        ax.hist(scores[labels == 0].numpy(), bins=bins, alpha=0.6, density=True, label="normal")
        ax.hist(scores[labels == 1].numpy(), bins=bins, alpha=0.6, density=True, label="anomalous")
        ax.set_title(title, fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
