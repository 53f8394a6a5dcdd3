"""Model cards: ``MODEL_CARD.md`` for a trained model, from its checkpoint and its run's results.

``anogan-lightning model-card <model.ckpt> [--results <results.json>] [--out <file or folder>]``.

Written by ``export`` beside the exported file, and by ``predict model_card=true`` beside
``predictions.csv``. Sections: intended use (research, not diagnosis); the model (method,
score, input, hyperparameters, code version); training data (root, files and digest per split,
images per class, from the checkpoint's provenance and the results); preprocessing (the data
settings the checkpoint carries, which predict and export rebuild); the decision threshold and
how it was chosen (Youden's J on the validation split); AUROC with its 95% CI, AP and the
operating point at the threshold on every test set of ``results.json`` (``test`` and the
``extra_test`` sets, ``test_<name>``), then per class; the known failure modes (a fixed list;
the cross-device measurements in
``experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md``). Every number is
copied from ``results.json`` or the checkpoint, none is recomputed.

The results are looked up beside the run: ``<run>/results.json`` for
``<run>/checkpoints/model.ckpt`` (an exported file: the checkpoint its sidecar names). Without
them the card says so and has no performance section; results of another run (another
training data digest) are refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from anogan_lightning import __version__, provenance

NAME = "MODEL_CARD.md"
SPLITS = ("train", "val", "test")
SECTIONS = (
    "Intended use",
    "Model",
    "Training data",
    "Preprocessing",
    "Decision threshold",
    "Performance",
    "Known failure modes",
)
#: the same for every model of this package; the device shift (mexico-dme) measured in
#: experiments/notes/2026-12-03-retina-windows-at-the-quality-budget.md
FAILURE_MODES = (
    "**Another device's scans shift the scores.** A model trained on one scanner's B-scans "
    "scores another scanner's normals differently (contrast, speckle, resolution, field of "
    "view): the test AUROC on another device's data (mexico-dme for Kermany-trained models) "
    "differs from the in-distribution test set, and the threshold does not carry over. Check "
    "a new device on its own labelled scans first (`extra_test`, experiments/README.md).",
    "**The threshold needs calibration at each site.** It is in the model's raw score units, "
    "chosen on this run's validation split; at another site, clinic or protocol, choose it "
    "again on local normal and abnormal scans (`predict threshold=<value>`).",
    "**Anything unlike the training normals scores high.** The model learned normal scans "
    "only: artefacts, low-signal or off-centre scans, other diseases and other devices are "
    "anomalous to it as much as the diseases it was tested on. A high score is not a finding.",
    "**Scans that fail preprocessing are not scored.** With retina-normalised windows, a "
    "B-scan whose retina boundaries are not found is reported `unreadable` (predict) and left "
    "out of the metrics, named in the log; it is not scored normal.",
    "**Small test sets give wide intervals.** Read the 95% CIs above; a per-class AUROC of a "
    "class with few images is uncertain, and an AUROC is not a sensitivity at a threshold.",
    "**Anomaly maps are coarse.** They point at regions that differ from the normals; they are "
    "not lesion segmentations (pixel metrics, where the data had masks, are in results.json).",
)


def _load_record(path: Path) -> dict:
    """What the card reads of a model: class, hparams, data settings, provenance, threshold and
    the checkpoint path; from a ``model.ckpt``, or from an exported file's sidecar (its
    checkpoint when that still exists)."""
    from anogan_lightning import exported

    if path.suffix.lower() in exported.EXPORT_SUFFIXES:
        side = exported.read_sidecar(path)
        ckpt = Path(side.get("checkpoint") or "")
        if ckpt.is_file():
            return _load_record(ckpt)
        threshold = side.get("threshold")
        return {
            "class": side["method"],
            "hparams": side.get("hparams", {}),
            "data": side.get("data", {}),
            "preprocessing": side.get("preprocessing"),
            "provenance": side.get("provenance", {}),
            "threshold": math.nan if threshold is None else float(threshold),
            "calibration": side.get("calibration"),
            "checkpoint": ckpt if side.get("checkpoint") else None,
            "source": path,
        }
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta = ckpt.get("anogan_lightning")
    if not meta:
        raise ValueError(f"{path} was not written by anogan_lightning.train (no method record)")
    threshold = ckpt.get("state_dict", {}).get("threshold")
    return {
        "class": meta["class"],
        "hparams": dict(ckpt.get("hyper_parameters", {})),
        "data": meta.get("data", {}),
        "preprocessing": meta.get("preprocessing"),
        "provenance": meta.get("provenance", {}),
        "threshold": math.nan if threshold is None else float(threshold),
        "calibration": meta.get("calibration"),
        "checkpoint": path,
        "source": path,
    }


def results_path(ckpt: Path | None, calibration: dict | None = None) -> Path | None:
    """``<run>/results.json`` of ``<run>/checkpoints/<name>.ckpt`` (or beside the checkpoint);
    for a site-calibrated checkpoint, that of the training run it was calibrated from."""
    if calibration and calibration.get("source_checkpoint"):
        return results_path(Path(calibration["source_checkpoint"]))
    if ckpt is None:
        return None
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "results.json"


def scored_sets(results: dict) -> list[str]:
    """Prefixes of the test sets scored: ``test``, then ``test_<name>`` in results order."""
    out = ["test"] if "test/auroc" in results else []
    for key in results:
        prefix, _, metric = key.partition("/")
        if prefix.startswith("test_") and metric == "auroc" and prefix not in out:
            out.append(prefix)
    return out


def _counts(results: dict, prefix: str, run: Path | None) -> tuple[int | None, int | None]:
    """(normal, anomalous) images of a test set: ``data/test_<cls>`` or
    ``data/test_<name>_<cls>`` of the results, else the labels of the run's ``scores.csv`` /
    ``scores_<name>.csv`` (one row per scored image)."""
    counts = tuple(results.get(f"data/{prefix}_{cls}") for cls in ("normal", "anomalous"))
    name = "scores.csv" if prefix == "test" else f"scores_{prefix.removeprefix('test_')}.csv"
    if None in counts and run is not None and (run / name).is_file():
        with open(run / name, newline="") as fh:
            labels = [row["label"] for row in csv.DictReader(fh)]
        counts = (labels.count("0"), labels.count("1"))
    return counts


def classes(results: dict, prefix: str) -> list[str]:
    """Disease classes with an AUROC of their own in ``<prefix>/auroc/<class>``."""
    head = f"{prefix}/auroc/"
    return [
        k[len(head) :]
        for k in results
        if k.startswith(head) and not k.endswith(("_ci_low", "_ci_high"))
    ]


def fmt(v) -> str:
    """A number as the card writes it (4 decimals); missing or NaN: an empty cell."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return ""
    return f"{v:.4f}"


def fmt_ci(results: dict, key: str) -> str:
    low, high = results.get(f"{key}_ci_low"), results.get(f"{key}_ci_high")
    return f"[{fmt(low)}, {fmt(high)}]" if fmt(low) and fmt(high) else ""


def _count(n) -> str:
    return "" if n is None else str(n)


def _method_info(class_path: str) -> tuple[str, tuple[str, ...], str]:
    """(class name, score components, summary line) of the method class, when importable."""
    name = class_path.rsplit(".", 1)[-1]
    try:
        import hydra

        cls = hydra.utils.get_class(class_path)
    except Exception:  # a class of another version: the card still gets written
        return name, (), ""
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return name, tuple(getattr(cls, "components", ())), summary


def _yaml(value) -> str:
    return yaml.safe_dump(json.loads(json.dumps(value, default=str)), sort_keys=False).rstrip()


def build(model: str | Path, results: str | Path | None = None) -> str:
    """The card's Markdown for a checkpoint or exported file (``results``: its run's
    ``results.json``; default: looked up beside the run)."""
    rec = _load_record(Path(model).resolve())
    res_path = (
        Path(results).resolve()
        if results
        else results_path(rec["checkpoint"], rec.get("calibration"))
    )
    res: dict = {}
    if res_path is not None and res_path.is_file():
        res = json.loads(res_path.read_text())
    elif results:
        raise FileNotFoundError(f"results {res_path} do not exist")
    prov = {**provenance.of(res), **(rec["provenance"] or {})}
    run_digest = res.get(provenance.PREFIX + "data_train_sha256")
    ckpt_digest = (rec["provenance"] or {}).get("data_train_sha256")
    if run_digest and ckpt_digest and run_digest != ckpt_digest:
        raise ValueError(
            f"{res_path} is of another run: its training data digest differs from the "
            f"checkpoint's ({run_digest[:12]} vs {ckpt_digest[:12]})"
        )
    name, components, summary = _method_info(rec["class"])
    hp, data = rec["hparams"], rec["data"] or {}
    size = hp.get("image_size", data.get("image_size"))
    threshold = rec["threshold"]
    lines = [
        f"# Model card: {name}",
        "",
        f"Written by anogan-lightning {__version__} from "
        f"`{rec['source']}`"
        + (f" and `{res_path}`" if res else " (no results.json found beside its run)")
        + ". Every number below is copied from them.",
        "",
        "## Intended use",
        "",
        "Research on unsupervised anomaly detection in retinal OCT B-scans: comparing methods, "
        "screening research data sets, studying what the model finds. **Not a medical device "
        "and not for diagnosis**, treatment or triage decisions: it was trained on normal scans "
        "of one data set and its score says how unlike those scans an input is, not whether a "
        "disease is present. Any clinical use needs its own validation.",
        "",
        "## Model",
        "",
        f"- Method: `{rec['class']}`" + (f": {summary}" if summary else ""),
        "- Score: higher is more anomalous (raw units, not a probability)"
        + (f"; components {', '.join(f'`{c}`' for c in components)}" if components else ""),
        f"- Input: {hp.get('channels', 1)} x {size} x {size} B-scans (or windows) in [-1, 1]",
        f"- Checkpoint: `{rec['checkpoint']}`" if rec["checkpoint"] else "- Checkpoint: unknown",
        f"- Code: anogan-lightning {prov.get('version') or '?'}, commit "
        f"`{prov.get('commit') or '?'}`" + (" (uncommitted changes)" if prov.get("dirty") else ""),
    ]
    if prov.get("command"):
        lines.append(f"- Training command: `{prov['command']}` (in `{prov.get('cwd', '?')}`)")
    lines += ["", "Hyperparameters:", "", "```yaml", _yaml(hp), "```"]

    lines += ["", "## Training data", ""]
    lines.append(f"- Data module: `{data.get('_target_', '?')}`")
    lines.append(f"- Root: `{prov.get('data_root') or data.get('root') or '(built in)'}`")
    rows = []
    for split in SPLITS:
        n_files = prov.get(f"data_{split}_files")
        digest = prov.get(f"data_{split}_sha256")
        normal, anomalous = (res.get(f"data/{split}_{c}") for c in ("normal", "anomalous"))
        if n_files is None and normal is None:
            continue
        digest = f"`{digest}`" if digest else ""
        rows.append(
            f"| {split} | {_count(n_files)} | {_count(normal)} | {_count(anomalous)} | {digest} |"
        )
    if rows:
        lines += [
            "",
            "| split | files | normal images | anomalous images | sha256 of the file list |",
            "|---|---|---|---|---|",
            *rows,
        ]
    lines += [
        "",
        "Trained on the normal images of the train split only. The digest is of the sorted "
        "list of relative paths and sizes (anogan_lightning.provenance): the same digest, the "
        "same files.",
    ]

    lines += ["", "## Preprocessing", ""]
    lines.append(
        "The data settings the checkpoint carries; `anogan-lightning predict` and `export` "
        "rebuild the preprocessing from them, so new scans are prepared as the test scans were."
    )
    lines += ["", "```yaml", _yaml(rec["preprocessing"] or data), "```"]

    lines += ["", "## Decision threshold", ""]
    cal = rec.get("calibration")
    if cal and not math.isnan(threshold):
        lines.append(
            f"**{threshold:.8g}** (raw score units): a scan is anomalous when its score >= the "
            f"threshold. Site-calibrated (`anogan-lightning calibrate`, {cal['when']}"
            + (f", site {cal['site']}" if cal.get("site") else "")
            + f") on {cal['n_scored']} normal scans of `{cal['normals']}` (digest "
            f"`{cal['scans_digest'][:12]}`): the cut-off keeping {cal['specificity_target']:g} "
            f"of them below it (reached on them: {cal['specificity_on_calibration_scans']:.3f}); "
            f"statistics re-estimated: {', '.join(cal['statistics']) or 'none'}. The training "
            f"run's validation threshold was {cal['threshold_before']:.8g}; the operating points "
            "under Performance are at that threshold, not at this one."
        )
    elif math.isnan(threshold):
        lines.append("None: the checkpoint was saved before validation chose one.")
    else:
        val_n = tuple(res.get(f"data/val_{c}") for c in ("normal", "anomalous"))
        lines.append(
            f"**{threshold:.8g}** (raw score units): a scan is anomalous when its score >= "
            "the threshold. Chosen on the validation split as the cut-off that maximises "
            "Youden's J = sensitivity + specificity - 1 of the validation ROC"
            + (f" ({val_n[0]} normal, {val_n[1]} anomalous images)" if None not in val_n else "")
            + "."
        )
        if "val/auroc" in res:
            lines.append(
                f"Validation AUROC {fmt(res['val/auroc'])} {fmt_ci(res, 'val/auroc')}; at the "
                f"threshold: sensitivity {fmt(res.get('val/sensitivity'))}, specificity "
                f"{fmt(res.get('val/specificity'))}."
            )

    lines += ["", "## Performance", ""]
    sets = scored_sets(res)
    if not res:
        lines.append("Unknown: no results.json of the training run was found.")
    elif res.get("status") == "incomplete":
        lines.append(f"None: training did not complete ({res.get('reason', '?')}).")
    elif not sets:
        lines.append("None: results.json holds no test metrics.")
    else:
        lines += [
            "Image-level AUROC with its bootstrap 95% CI (stratified resampling of the test "
            "images), average precision, and the operating point at the validation threshold, "
            "on every test set the run scored (`test`: the data's test split; `test_<name>`: "
            "the `extra_test` sets, scored with the same model and threshold). Images per "
            "class: as scored (scores*.csv of the run).",
            "",
            "| test set | normal | anomalous | AUROC | 95% CI | AP | sensitivity at threshold "
            "| specificity at threshold |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for prefix in sets:
            normal, anomalous = _counts(res, prefix, res_path.parent)
            cells = [
                prefix,
                _count(normal),
                _count(anomalous),
                fmt(res.get(f"{prefix}/auroc")),
                fmt_ci(res, f"{prefix}/auroc"),
                fmt(res.get(f"{prefix}/ap")),
                fmt(res.get(f"{prefix}/sensitivity_at_val_threshold")),
                fmt(res.get(f"{prefix}/specificity_at_val_threshold")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [
            f"- `{p}`: {res[f'{p}/status']}"
            + (f" ({res[f'{p}/reason']})" if res.get(f"{p}/reason") else "")
            for p in sets
            if res.get(f"{p}/status") not in (None, "ok")
        ]
        if notes:
            lines += ["", "Test sets not scored in full:", "", *notes]
        per_class = [(p, c) for p in sets for c in classes(res, p)]
        if per_class:
            lines += [
                "",
                "Per class (each disease class against all normals of its test set):",
                "",
                "| test set | class | AUROC | 95% CI |",
                "|---|---|---|---|",
            ]
            for p, c in per_class:
                key = f"{p}/auroc/{c}"
                lines.append(f"| {p} | {c} | {fmt(res.get(key))} | {fmt_ci(res, key)} |")
        pixel = [p for p in sets if fmt(res.get(f"{p}/pixel_auroc"))]
        if pixel:
            lines += ["", "Pixel AUROC of the anomaly maps (test sets with masks):", ""]
            lines += [f"- `{p}`: {fmt(res[f'{p}/pixel_auroc'])}" for p in pixel]

    lines += ["", "## Known failure modes", ""]
    lines += [f"- {m}" for m in FAILURE_MODES]
    lines += ["", "Measurements behind these: experiments/README.md of anogan-lightning."]
    return "\n".join(lines) + "\n"


def write(model: str | Path, out: str | Path, results: str | Path | None = None) -> Path:
    """Write the card of ``model`` to ``out`` (a file, or a folder: ``<out>/MODEL_CARD.md``)."""
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / NAME
    text = build(model, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a model.ckpt (or an exported .onnx / .pt)")
    ap.add_argument("--results", type=Path, default=None, help="default: <run>/results.json")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"file or folder (default: {NAME} beside the model)"
    )
    args = ap.parse_args(argv)
    try:
        path = write(args.model, args.out or args.model.parent, args.results)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
