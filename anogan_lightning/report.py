"""Compare finished runs: ``python -m anogan_lightning.report <sweep dir | run dirs...>``.

A run directory is one that holds a ``config.yaml`` (written by the entry point) or a
``.hydra/`` folder (written by Hydra before the job starts). Finished runs have a
``results.json`` with test metrics; the others are listed as failed, with the reason read
from ``error.txt`` (written by the entry point when a job raises) or the job's log.

Writes into the first directory given (the sweep directory) or ``--out``:
- ``report.md`` and ``report.csv``: one row per run (method, overrides, val/test AUROC, AP,
  accuracy and sensitivity at the validation threshold, sensitivity / specificity / precision /
  recall at the Youden cut-off, and the test AUROC of every score component, e.g. image vs latent
  score or AnoGAN's R, D and PD), then the same averaged over seeds (mean ± std) where runs
  differ only in ``seed``; the test and pixel AUROC of every extra test set (``extra_test``,
  ``test_<name>/``); failed runs with their reason;
- ``roc.png``: every run's test ROC in one plot, from its ``scores.csv``;
- ``score_distributions.png``: normal vs anomalous test score histograms, one panel per run.
The Markdown table is printed too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from anogan_lightning import evaluation  # noqa: E402

COLUMNS = (
    ("val AUROC", "val/auroc"),
    ("test AUROC", "test/auroc"),
    ("test AP", "test/ap"),
    ("acc@val thr", "test/accuracy_at_val_threshold"),
    ("sens@val thr", "test/sensitivity_at_val_threshold"),
    ("sens", "test/sensitivity"),
    ("spec", "test/specificity"),
    ("prec", "test/precision"),
    ("rec", "test/recall"),
)
EXTRA_METRICS = ("auroc", "pixel_auroc")  # reported per extra test set
IGNORED_OVERRIDES = ("hydra.", "paths.", "trainer.enable_progress_bar", "method.progress")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories under (or at) each path, sorted, without duplicates."""
    runs: set[Path] = set()
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory")
        runs |= {c.parent.parent for c in p.rglob(".hydra/config.yaml")}
        runs |= {c.parent for c in p.rglob("results.json") if (c.parent / "config.yaml").is_file()}
    # loggers keep their own config files (wandb/run-*/files/config.yaml): not runs
    return sorted(r for r in runs if "wandb" not in r.parts and "tensorboard" not in r.parts)


def _overrides(run: Path) -> list[str]:
    f = run / ".hydra/overrides.yaml"
    if not f.is_file():
        return []
    items = yaml.safe_load(f.read_text()) or []
    return [o for o in items if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]


def _failure_reason(run: Path) -> str:
    err = run / "error.txt"
    if err.is_file():
        lines = [ln for ln in err.read_text().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "error.txt is empty"
    for log in sorted(run.glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        if errors:
            return errors[-1][:300]
    return "no results.json (still running, killed, or crashed before writing it)"


def load_run(run: Path) -> dict:
    """Flat record: dir, status, method, overrides, seed, metrics (or the failure reason)."""
    overrides = _overrides(run)
    rec = {"run": run, "overrides": [o for o in overrides if not o.startswith("seed=")]}
    seeds = [o.split("=", 1)[1] for o in overrides if o.startswith("seed=")]
    cfg_file = run / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    rec["seed"] = seeds[0] if seeds else str((cfg or {}).get("seed", ""))
    target = ((cfg or {}).get("method") or {}).get("_target_", "")
    rec["method"] = target.rsplit(".", 1)[-1] or next(
        (o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("method=")), "?"
    )
    res_file = run / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    if "test/auroc" in results:
        rec["status"] = "finished"
        rec["metrics"] = {key: results.get(key) for _, key in COLUMNS}
        prefix = "test/auroc_"
        rec["components"] = {
            k.removeprefix(prefix): v for k, v in results.items() if k.startswith(prefix)
        }
        rec["method"] = results.get("method", rec["method"])
        rec["extra"] = {k: v for k, v in results.items() if _is_extra(k)}
    else:
        rec["status"] = "failed"
        rec["reason"] = _failure_reason(run)
    return rec


def _is_extra(key: str) -> bool:
    """AUROCs of the extra test sets (``extra_test``): ``test_<name>/auroc``, ``.../pixel_auroc``."""
    prefix, _, metric = key.partition("/")
    return prefix.startswith("test_") and metric in EXTRA_METRICS


def _extra_table(records: list[dict], root: Path) -> list[str]:
    """One row per run, one column per extra test set and metric (none: no lines)."""
    keys = sorted({k for r in records for k in r.get("extra", {})})
    if not keys:
        return []
    lines = ["", "Extra test sets (`extra_test`):", ""]
    lines += ["| run | method | " + " | ".join(keys) + " |", "|" + "---|" * (2 + len(keys))]
    for r in records:
        cells = [_fmt(r.get("extra", {}).get(k)) for k in keys]
        lines.append(f"| {_rel(r['run'], root)} | {r['method']} | " + " | ".join(cells) + " |")
    return lines


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def aggregate(records: list[dict]) -> list[dict]:
    """Mean ± std over seeds of runs with the same method and other overrides (n > 1 only)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], tuple(r["overrides"]))].append(r)
    out = []
    for (method, overrides), rs in groups.items():
        if len({r["seed"] for r in rs}) < 2:  # only runs that differ in their seed
            continue
        row = {"method": method, "overrides": list(overrides), "n": len(rs), "stats": {}}
        for _, key in COLUMNS:
            vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
            if vals:
                t = torch.tensor(vals, dtype=torch.float64)
                std = float(t.std()) if len(vals) > 1 else 0.0
                row["stats"][key] = (float(t.mean()), std)
        out.append(row)
    return out


def markdown(records: list[dict], groups: list[dict], failed: list[dict], root: Path) -> str:
    head = "| run | method | overrides | seed | " + " | ".join(c for c, _ in COLUMNS)
    lines = [head + " | test AUROC by component |", "|" + "---|" * (5 + len(COLUMNS))]
    for r in records:
        cells = [_fmt(r["metrics"][k]) for _, k in COLUMNS]
        name = _rel(r["run"], root)
        over = " ".join(r["overrides"])
        lines.append(
            f"| {name} | {r['method']} | {over} | {r['seed']} | "
            + " | ".join(cells)
            + f" | {_components(r, ', ')} |"
        )
    if groups:
        lines += ["", "Mean ± std over seeds:", ""]
        lines.append("| method | overrides | n | " + " | ".join(c for c, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * (3 + len(COLUMNS)))
        for g in groups:
            cells = [
                f"{g['stats'][k][0]:.4f} ± {g['stats'][k][1]:.4f}" if k in g["stats"] else ""
                for _, k in COLUMNS
            ]
            over = " ".join(g["overrides"])
            lines.append(f"| {g['method']} | {over} | {g['n']} | " + " | ".join(cells) + " |")
    lines += _extra_table(records, root)
    if failed:
        lines += ["", f"Failed runs ({len(failed)}):", ""]
        lines += [
            f"- {_rel(r['run'], root)} ({' '.join(r['overrides'])}): {r['reason']}" for r in failed
        ]
    return "\n".join(lines)


def _components(r: dict, sep: str) -> str:
    """Test AUROC per score component, e.g. ``image 0.7012, latent 0.6610``."""
    return sep.join(f"{k} {_fmt(v)}" for k, v in sorted(r.get("components", {}).items()))


def _rel(run: Path, root: Path) -> str:
    try:
        return str(run.relative_to(root)) or "."
    except ValueError:
        return str(run)


def write_csv(path: Path, records: list[dict], failed: list[dict], root: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "run",
                "status",
                "method",
                "overrides",
                "seed",
                *[k for _, k in COLUMNS],
                "test/auroc_components",
                "extra_test",
                "reason",
            ]
        )
        for r in records:
            vals = [_fmt(r["metrics"][k]) for _, k in COLUMNS]
            w.writerow(
                [
                    _rel(r["run"], root),
                    "finished",
                    r["method"],
                    " ".join(r["overrides"]),
                    r["seed"],
                    *vals,
                    _components(r, "; "),
                    "; ".join(f"{k} {_fmt(v)}" for k, v in sorted(r.get("extra", {}).items())),
                    "",
                ]
            )
        for r in failed:
            blanks = [""] * len(COLUMNS)
            w.writerow(
                [
                    _rel(r["run"], root),
                    "failed",
                    r["method"],
                    " ".join(r["overrides"]),
                    r["seed"],
                    *blanks,
                    "",
                    "",
                    r["reason"],
                ]
            )


def _scores(run: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    f = run / "scores.csv"
    if not f.is_file():
        return None
    with open(f) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    labels = torch.tensor([int(r["label"]) for r in rows])
    scores = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64)
    return scores, labels


def plot_roc_overlay(path: Path, records: list[dict], root: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 6))
    for r in records:
        s = _scores(r["run"])
        if s is None or not evaluation.has_both_classes(s[1]):
            continue
        fpr, tpr, _ = evaluation.roc_curve(*s)
        label = f"{r['method']} {' '.join(r['overrides'][:3])} s{r['seed']} ({evaluation.auroc(*s):.3f})"
        ax.plot(fpr, tpr, lw=1.2, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=f"test ROC: {root.name}"
    )
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(path: Path, records: list[dict], root: Path) -> None:
    runs = [(r, s) for r in records if (s := _scores(r["run"])) is not None]
    if not runs:
        return
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(runs) :]:
        ax.axis("off")
    for ax, (r, (scores, labels)) in zip(axes.flat, runs, strict=False):
        bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-9, 31).numpy()
        ax.hist(scores[labels == 0].numpy(), bins=bins, alpha=0.6, density=True, label="normal")
        ax.hist(scores[labels == 1].numpy(), bins=bins, alpha=0.6, density=True, label="anomalous")
        ax.set_title(f"{r['method']} {_rel(r['run'], root)}", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list[Path], out: Path | None = None) -> str:
    """Write the report files and return the Markdown table."""
    paths = [Path(p) for p in paths]
    out = Path(out) if out else paths[0]
    runs = find_runs([p.resolve() for p in paths])
    if not runs:
        raise FileNotFoundError(f"no run directories (with config.yaml or .hydra/) under {paths}")
    records = [load_run(r) for r in runs]
    done = [r for r in records if r["status"] == "finished"]
    failed = [r for r in records if r["status"] == "failed"]
    groups = aggregate(done)
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    table = markdown(done, groups, failed, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# Report: {root}\n\n{table}\n")
    write_csv(out / "report.csv", done, failed, root)
    if done:
        plot_roc_overlay(out / "roc.png", done, root)
        plot_distributions(out / "score_distributions.png", done, root)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a sweep directory or run directories")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: first path)")
    args = ap.parse_args(argv)
    try:
        table = report(args.paths, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nreport: {(args.out or args.paths[0]) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
