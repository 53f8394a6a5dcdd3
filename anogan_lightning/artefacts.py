"""Run artefacts: results.json, scores.csv and the results table (the figures:
:mod:`anogan_lightning.evaluation.figures`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from anogan_lightning.evaluation.collector import NOT_SCORED
from anogan_lightning.evaluation.metrics import is_ci

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


def not_scored(results: dict) -> list[str]:
    """``<split>: <reason>`` for each test split (``test``, ``test_<name>``) of a results dict
    that could not be scored (``<split>/status: not_scored``)."""
    return [
        f"{k.split('/')[0]}: {results.get(k.replace('/status', '/reason'), '')}"
        for k, v in results.items()
        if k.startswith("test") and k.endswith("/status") and v == NOT_SCORED
    ]


def read_finished(out_dir: Path) -> dict | None:
    """The results of a run that already finished in ``out_dir`` (its ``results.json`` has a
    test AUROC and no test split left unscored, or says the training was incomplete, which a
    rerun would repeat), else None."""
    f = out_dir / "results.json"
    if not f.is_file():
        return None
    try:
        results = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if results.get("status") == "incomplete":
        return results
    return results if "test/auroc" in results and not not_scored(results) else None


def write_scores(path: Path, record: dict) -> None:
    """One row per image: id, label, score, every score component and reference score (in the
    record's ``columns`` order where it has one), and ``class`` (the image's class name) where
    the data knows sub-classes."""
    values = {**record["components"], **record.get("references", {})}
    names = list(record.get("columns") or values)
    classes = record.get("classes")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "score", *names, *(["class"] if classes else [])])
        for i, id_ in enumerate(record["ids"]):
            row = [id_, int(record["labels"][i]), f"{float(record['score'][i]):.8g}"]
            row += [f"{float(values[n][i]):.8g}" for n in names]
            if classes:
                row.append(classes[i])
            w.writerow(row)


def _splits(results: dict) -> list[str]:
    """The evaluated splits of a results dict: val, test, then the extra test sets
    (``test_<name>``) in their order."""
    prefixes = dict.fromkeys(k.split("/", 1)[0] for k in results if "/" in k)
    extra = [p for p in prefixes if p.startswith("test_")]
    return [s for s in ("val", "test") if s in prefixes] + extra


def format_table(results: dict, title: str = "") -> str:
    """A Markdown table: one row per metric, one column per split (val, test, the extra test
    sets); first each split's status (``ok``, or ``partial`` / ``not_scored`` with the
    reason), then the metrics; AUROCs with their bootstrap 95% interval in brackets; component
    and per-class AUROCs after the main metrics."""
    splits = _splits(results)
    keys = list(TABLE_KEYS)
    names = {k.split("/", 1)[1] for k in results if "/" in k and not is_ci(k)}
    keys += sorted(n for n in names if n.startswith("auroc_"))
    keys += sorted(n for n in names if n.startswith("auroc/"))
    lines = []
    if title:
        lines.append(title)
    lines.append("| metric | " + " | ".join(splits) + " |")
    lines.append("|---|" + "---|" * len(splits))
    status = []
    for s in splits:
        cell = str(results.get(f"{s}/status", ""))
        if results.get(f"{s}/reason"):
            cell += f": {results[f'{s}/reason']}"
        status.append(cell.replace("|", "/"))
    if any(status):
        lines.append("| status | " + " | ".join(status) + " |")
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
