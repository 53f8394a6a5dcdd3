"""Compare finished runs: ``python -m anogan_lightning.report <sweep dir | run dirs...>``.

A run directory is one that holds a ``config.yaml`` (written by the entry point) or a
``.hydra/`` folder (written by Hydra before the job starts). Finished runs have a
``results.json`` with test metrics; the others are listed as failed, with the reason read
from ``error.txt`` (written by the entry point when a job raises) or the job's log.

Writes into the first directory given (the sweep directory) or ``--out``:
- ``report.md`` and ``report.csv``: one row per run (method, overrides, val/test AUROC, the test
  AUROC's bootstrap 95% CI, AP, accuracy and sensitivity at the validation threshold,
  sensitivity / specificity / precision / recall at the Youden cut-off, the test AUROC of every
  score component, e.g. image vs latent score or AnoGAN's R, D and PD, and of every disease
  class against the normals where the data has classes), then the same averaged over seeds
  (mean ± std) where runs differ only in ``seed``; failed runs (and runs whose training did not
  complete) with their reason; the test and pixel AUROC of every extra test set
  (``extra_test``, ``test_<name>/``);
- with ``--reference <method or run dir>``: per run, the paired difference of its test AUROC to
  the reference run scored on the same test images (rows of ``scores.csv`` matched by ``id``;
  the reference run of the same seed where the reference is a method with several seeds) with a
  paired bootstrap 95% CI; per seed group, the mean difference over seeds with a CI from
  resampling images and seeds
  (:func:`anogan_lightning.evaluation.metrics.pooled_paired_difference`);
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

import torch
import yaml

from anogan_lightning import provenance
from anogan_lightning.evaluation import figures, metrics

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


def _method_name(overrides: list[str]) -> str | None:
    """The ``+method=<name>`` (or ``+experiment=<name>``) choice of a run, if any."""
    for prefix in ("method=", "experiment="):
        for o in overrides:
            if o.lstrip("+").startswith(prefix):
                return o.split("=", 1)[1]
    return None


def load_run(run: Path) -> dict:
    """Flat record: dir, status (finished / incomplete / failed), method, overrides, seed,
    metrics, CIs, component and per-class AUROCs (or the failure reason)."""
    overrides = _overrides(run)
    rec = {"run": run, "overrides": [o for o in overrides if not o.startswith("seed=")]}
    seeds = [o.split("=", 1)[1] for o in overrides if o.startswith("seed=")]
    cfg_file = run / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    rec["seed"] = seeds[0] if seeds else str((cfg or {}).get("seed", ""))
    target = ((cfg or {}).get("method") or {}).get("_target_", "")
    rec["method"] = target.rsplit(".", 1)[-1] or _method_name(overrides) or "?"
    rec["name"] = _method_name(overrides) or rec["method"].lower()  # as in +method=<name>
    res_file = run / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    rec["results"] = results
    if "test/auroc" in results:
        rec["status"] = "finished"
        rec["metrics"] = {key: results.get(key) for _, key in COLUMNS}
        rec["ci"] = (results.get("test/auroc_ci_low"), results.get("test/auroc_ci_high"))
        prefix = "test/auroc_"
        rec["components"] = {
            k.removeprefix(prefix): v
            for k, v in results.items()
            if k.startswith(prefix) and not metrics.is_ci(k)
        }
        prefix = "test/auroc/"
        rec["classes"] = {
            k.removeprefix(prefix): v
            for k, v in results.items()
            if k.startswith(prefix) and not metrics.is_ci(k)
        }
        rec["method"] = results.get("method", rec["method"])
        rec["extra"] = {k: v for k, v in results.items() if _is_extra(k)}
    elif results.get("status") == "incomplete":
        rec["status"] = "incomplete"
        rec["reason"] = f"incomplete: {results.get('reason', 'training did not complete')}"
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


def _fmt_ci(ci) -> str:
    low, high = ci if ci else (None, None)
    return "" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"


def _fmt_delta(delta) -> str:
    if not delta:
        return ""
    diff, low, high = delta[:3]
    return f"{diff:+.4f} [{low:+.3f}, {high:+.3f}]"


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
        row["runs"] = rs
        for _, key in COLUMNS:
            vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
            if vals:
                row["stats"][key] = mean_std(vals)
        out.append(row)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


# -- paired differences to a reference run ---------------------------------------------------
def read_scores(run: Path) -> dict[str, tuple[int, float]] | None:
    """``id -> (label, score)`` from a run's scores.csv (None without one)."""
    f = run / "scores.csv"
    if not f.is_file():
        return None
    with open(f) as fh:
        return {r["id"]: (int(r["label"]), float(r["score"])) for r in csv.DictReader(fh)}


def matched_scores(
    a: dict[str, tuple[int, float]], b: dict[str, tuple[int, float]]
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(ids, scores_a, scores_b, labels) over the images both runs scored, sorted by id; None
    when fewer than both classes are shared or a shared id has two labels (other images)."""
    ids = sorted(set(a) & set(b))
    if any(a[i][0] != b[i][0] for i in ids):
        return None
    labels = torch.tensor([a[i][0] for i in ids], dtype=torch.long)
    if not metrics.has_both_classes(labels):
        return None
    sa = torch.tensor([a[i][1] for i in ids], dtype=torch.float64)
    sb = torch.tensor([b[i][1] for i in ids], dtype=torch.float64)
    return ids, sa, sb, labels


def reference_runs(records: list[dict], reference: str) -> list[dict]:
    """Finished runs named by ``reference``: a run directory, or a method (its ``+method=``
    name or class name, any case)."""
    path = Path(reference)
    if path.is_dir():
        target = path.resolve()
        return [r for r in records if Path(r["run"]).resolve() == target]
    ref = reference.lower()
    return [r for r in records if ref in (r["name"].lower(), r["method"].lower())]


def pair_with_reference(rec: dict, refs: list[dict]) -> dict | None:
    """The reference run to compare ``rec`` with: the one of the same seed, else the only one."""
    if rec in refs:
        return rec
    same_seed = [r for r in refs if r["seed"] == rec["seed"]]
    if len(same_seed) == 1:
        return same_seed[0]
    return refs[0] if len(refs) == 1 else None


def add_differences(records: list[dict], groups: list[dict], reference: str) -> None:
    """Sets ``delta`` = (AUROC - reference AUROC, CI low, CI high, n images) on each finished
    run and seed group that has a reference run on the same test images."""
    refs = reference_runs(records, reference)
    if not refs:
        raise ValueError(f"--reference {reference}: no finished run of that method or directory")
    cache: dict[Path, dict | None] = {}

    def scores(r: dict) -> dict | None:
        if r["run"] not in cache:
            cache[r["run"]] = read_scores(r["run"])
        return cache[r["run"]]

    def pair(r: dict):
        ref = pair_with_reference(r, refs)
        if ref is None or scores(r) is None or scores(ref) is None:
            return None
        return matched_scores(scores(r), scores(ref))

    for r in records:
        m = pair(r)
        if m is not None:
            ids, sa, sb, labels = m
            r["delta"] = (*metrics.paired_auroc_difference(sa, sb, labels), len(ids))
    for g in groups:
        pairs = [m for r in g["runs"] if (m := pair(r)) is not None]
        if len(pairs) < len(g["runs"]):
            continue  # not every seed has its reference run: no pooled difference
        same = all(m[0] == pairs[0][0] and torch.equal(m[3], pairs[0][3]) for m in pairs)
        triples = [(sa, sb, labels) for _, sa, sb, labels in pairs]
        g["delta"] = (
            *metrics.pooled_paired_difference(triples, same_images=same),
            len(pairs[0][0]),
        )


def markdown(
    records: list[dict],
    groups: list[dict],
    failed: list[dict],
    root: Path,
    reference: str | None = None,
) -> str:
    delta_head = [f"Δ test AUROC vs {reference} [95% CI]"] if reference else []
    heads = [c for c, _ in COLUMNS]
    heads.insert(heads.index("test AUROC") + 1, "test AUROC 95% CI")
    heads += delta_head
    head = "| run | method | overrides | seed | " + " | ".join(heads)
    lines = [
        head + " | test AUROC by component | test AUROC by class |",
        "|" + "---|" * (6 + len(heads)),
    ]
    for r in records:
        cells = [_fmt(r["metrics"][k]) for _, k in COLUMNS]
        cells.insert(heads.index("test AUROC 95% CI"), _fmt_ci(r.get("ci")))
        if reference:
            cells.append(_fmt_delta(r.get("delta")))
        name = _rel(r["run"], root)
        over = " ".join(r["overrides"])
        lines.append(
            f"| {name} | {r['method']} | {over} | {r['seed']} | "
            + " | ".join(cells)
            + f" | {_components(r, ', ')} | {_components(r, ', ', 'classes')} |"
        )
    if groups:
        lines += ["", "Mean ± std over seeds:", ""]
        gheads = [c for c, _ in COLUMNS] + delta_head
        lines.append("| method | overrides | n | " + " | ".join(gheads) + " |")
        lines.append("|" + "---|" * (3 + len(gheads)))
        for g in groups:
            cells = [
                f"{g['stats'][k][0]:.4f} ± {g['stats'][k][1]:.4f}" if k in g["stats"] else ""
                for _, k in COLUMNS
            ]
            if reference:
                cells.append(_fmt_delta(g.get("delta")))
            over = " ".join(g["overrides"])
            lines.append(f"| {g['method']} | {over} | {g['n']} | " + " | ".join(cells) + " |")
    if reference:
        lines += [
            "",
            f"Δ: test AUROC minus that of the reference ({reference}) on the same test images "
            "(scores.csv rows matched by id), paired bootstrap 95% CI "
            f"({metrics.N_BOOT} stratified resamples); for a seed group, the mean Δ over "
            "seed-paired runs, images and seeds resampled.",
        ]
    lines += _extra_table(records, root)
    if failed:
        lines += ["", f"Failed runs ({len(failed)}):", ""]
        lines += [
            f"- {_rel(r['run'], root)} ({' '.join(r['overrides'])}): {r['reason']}" for r in failed
        ]
    return "\n".join(lines)


def _components(r: dict, sep: str, key: str = "components") -> str:
    """Test AUROC per score component (``image 0.7012, latent 0.6610``) or per class."""
    return sep.join(f"{k} {_fmt(v)}" for k, v in sorted(r.get(key, {}).items()))


def _rel(run: Path, root: Path) -> str:
    try:
        return str(run.relative_to(root)) or "."
    except ValueError:
        return str(run)


#: provenance entries of results.json repeated in report.csv (what made each number)
PROVENANCE_COLUMNS = (
    "commit",
    "dirty",
    "version",
    "torch",
    "lightning",
    "device",
    "precision",
    "threads",
    "data_root",
    "data_test_sha256",
    "command",
)


def _provenance(r: dict) -> list[str]:
    info = provenance.of(r.get("results") or {})
    return ["" if info.get(k) is None else str(info[k]) for k in PROVENANCE_COLUMNS]


def write_csv(path: Path, records: list[dict], failed: list[dict], root: Path) -> None:
    delta = ["delta_test_auroc", "delta_ci_low", "delta_ci_high"]
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
                "test/auroc_ci_low",
                "test/auroc_ci_high",
                *delta,
                "test/auroc_components",
                "test/auroc_classes",
                "extra_test",
                "reason",
                *(f"provenance/{k}" for k in PROVENANCE_COLUMNS),
            ]
        )
        for r in records:
            vals = [_fmt(r["metrics"][k]) for _, k in COLUMNS]
            ci = [_fmt(v) for v in r.get("ci") or (None, None)]
            d = [_fmt(v) for v in r["delta"][:3]] if r.get("delta") else [""] * 3
            w.writerow(
                [
                    _rel(r["run"], root),
                    "finished",
                    r["method"],
                    " ".join(r["overrides"]),
                    r["seed"],
                    *vals,
                    *ci,
                    *d,
                    _components(r, "; "),
                    _components(r, "; ", "classes"),
                    "; ".join(f"{k} {_fmt(v)}" for k, v in sorted(r.get("extra", {}).items())),
                    "",
                    *_provenance(r),
                ]
            )
        for r in failed:
            blanks = [""] * (len(COLUMNS) + 2 + len(delta))
            w.writerow(
                [
                    _rel(r["run"], root),
                    r["status"],
                    r["method"],
                    " ".join(r["overrides"]),
                    r["seed"],
                    *blanks,
                    "",  # components
                    "",  # classes
                    "",  # extra test sets
                    r["reason"],
                    *_provenance(r),
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
    """Every run's test ROC in one plot (from its scores.csv)."""
    curves = [
        (f"{r['method']} {' '.join(r['overrides'][:3])} s{r['seed']}", *s)
        for r in records
        if (s := _scores(r["run"])) is not None
    ]
    figures.plot_roc_overlay(path, curves, f"test ROC: {root.name}")


def plot_distributions(path: Path, records: list[dict], root: Path) -> None:
    """Normal vs anomalous test scores, one panel per run (from its scores.csv)."""
    panels = [
        (f"{r['method']} {_rel(r['run'], root)}", *s)
        for r in records
        if (s := _scores(r["run"])) is not None
    ]
    figures.plot_score_distributions(path, panels)


def collect(paths: list[Path]) -> tuple[list[dict], list[dict], Path]:
    """(finished runs, failed or incomplete runs, common root) under ``paths``."""
    paths = [Path(p) for p in paths]
    runs = find_runs([p.resolve() for p in paths])
    if not runs:
        raise FileNotFoundError(f"no run directories (with config.yaml or .hydra/) under {paths}")
    records = [load_run(r) for r in runs]
    done = [r for r in records if r["status"] == "finished"]
    failed = [r for r in records if r["status"] != "finished"]
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    return done, failed, root


def report(paths: list[Path], out: Path | None = None, reference: str | None = None) -> str:
    """Write the report files and return the Markdown table."""
    paths = [Path(p) for p in paths]
    out = Path(out) if out else paths[0]
    done, failed, root = collect(paths)
    groups = aggregate(done)
    if reference:
        add_differences(done, groups, reference)
    table = markdown(done, groups, failed, root, reference)
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
    ap.add_argument(
        "--reference",
        default=None,
        help="a method (e.g. autoencoder) or run directory: every run's test AUROC difference "
        "to it, with a paired bootstrap 95%% CI",
    )
    args = ap.parse_args(argv)
    try:
        table = report(args.paths, args.out, args.reference)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nreport: {(args.out or args.paths[0]) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
