"""Run artefacts: results.json, scores.csv, roc.png, score_hist.png, samples.png, the table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from anogan_lightning import evaluation, pixel_eval  # noqa: E402

TABLE_KEYS = (
    "auroc",
    "ap",
    "sensitivity",
    "specificity",
    "precision",
    "recall",
    "accuracy_at_val_threshold",
    "sensitivity_at_val_threshold",
    "pixel_auroc",
    "pixel_best_dice",
)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def write_results(path: Path, results: dict) -> None:
    """Flat ``{"test/auroc": ..., ...}`` JSON; written atomically (rename) so a crash mid-write
    never leaves a truncated file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: _jsonable(v) for k, v in results.items()}, indent=2) + "\n")
    tmp.replace(path)


def read_finished(out_dir: Path) -> dict | None:
    """The results of a run that already finished in ``out_dir`` (its ``results.json`` has a
    test AUROC, or says the training was incomplete, which a rerun would repeat), else None."""
    f = out_dir / "results.json"
    if not f.is_file():
        return None
    try:
        results = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if results.get("status") == "incomplete":
        return results
    return results if "test/auroc" in results else None


def write_scores(path: Path, record: dict) -> None:
    """One row per image: id, label, score, every score component, and ``class`` (the image's
    class name) where the data knows sub-classes."""
    names = list(record["components"])
    classes = record.get("classes")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "score", *names, *(["class"] if classes else [])])
        for i, id_ in enumerate(record["ids"]):
            row = [id_, int(record["labels"][i]), f"{float(record['score'][i]):.8g}"]
            row += [f"{float(record['components'][n][i]):.8g}" for n in names]
            if classes:
                row.append(classes[i])
            w.writerow(row)


def _all_scores(record: dict) -> dict[str, torch.Tensor]:
    return {"score": record["score"], **record["components"]}


def plot_roc(path: Path, record: dict, title: str = "") -> plt.Figure:
    """Test ROC of the anomaly score with every component's ROC overlaid (AnoGAN Fig. 4b)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = record["labels"]
    for name, s in _all_scores(record).items():
        fpr, tpr, _ = evaluation.roc_curve(s, labels)
        auc = evaluation.auroc(s, labels)
        ax.plot(fpr, tpr, lw=2 if name == "score" else 1, label=f"{name} (AUC {auc:.3f})")
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
    if evaluation.has_both_classes(record["labels"]):
        figs["roc"] = plot_roc(out_dir / "roc.png", record, title)
        figs["score_hist"] = plot_score_hist(out_dir / "score_hist.png", record, title)
    if samples:
        figs["samples"] = plot_samples(out_dir / "samples.png", samples, title)
    write_anomaly_maps(out_dir, record, title)
    pixel = record.get("pixel")
    if pixel is not None:  # stitched B-scans of OCT volumes with their masks
        pixel_eval.write_overlays(
            out_dir / "bscans", pixel["maps"], pixel["masks"], pixel["image"], pixel["ids"], n=8
        )
    return figs


def _is_ci(key: str) -> bool:
    return key.endswith(("_ci_low", "_ci_high"))


def format_table(results: dict, title: str = "") -> str:
    """A Markdown table: one row per metric, one column per split; AUROCs with their bootstrap
    95% interval in brackets; component and per-class AUROCs after the main metrics."""
    splits = [s for s in ("val", "test") if any(k.startswith(f"{s}/") for k in results)]
    keys = list(TABLE_KEYS)
    names = {k.split("/", 1)[1] for k in results if "/" in k and not _is_ci(k)}
    keys += sorted(n for n in names if n.startswith("auroc_"))
    keys += sorted(n for n in names if n.startswith("auroc/"))
    lines = []
    if title:
        lines.append(title)
    lines.append("| metric | " + " | ".join(splits) + " |")
    lines.append("|---|" + "---|" * len(splits))
    for key in keys:
        cells = []
        for s in splits:
            v = results.get(f"{s}/{key}")
            cell = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            low, high = results.get(f"{s}/{key}_ci_low"), results.get(f"{s}/{key}_ci_high")
            if cell and low is not None and high is not None:
                cell += f" [{low:.3f}, {high:.3f}]"
            cells.append(cell)
        if any(cells):
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
