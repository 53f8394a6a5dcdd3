"""Site calibration on a device the models never saw: mexico-dme (another scanner, NORMAL vs DME).

What it measures, for trained B-scan runs ``<runs>/<method>_s<seed>/checkpoints/model.ckpt``
(Kermany-trained; their stored threshold is Kermany's validation Youden cut-off):

1. Threshold-only calibration (``python -m anogan_lightning.calibrate``, ``adabn=false
   map_norm=false``). Every scan of the site is scored once by ``anogan_lightning.predict``;
   calibrating on some of the site's normals then is exactly
   :func:`~anogan_lightning.calibration.threshold_at_specificity` on their scores, so it is
   computed in numpy for ``--splits`` random patient-grouped splits of the NORMAL scans into a
   calibration part (whole patients, drawn until >= n scans, for each n of ``--sizes``) and a
   test part (the other NORMAL scans and every DME scan; no patient in both parts). Per split:
   the test AUROC (a threshold does not change it), specificity and sensitivity on the test
   part at the stored threshold and at the calibrated one (target ``--specificity``).
2. The shortcut checked against the real command: once per model, ``calibrate`` is run as a
   subprocess on the first split of the largest n (normals as a CSV with a ``path`` column);
   its threshold must equal the numpy one to 1e-9, and its scores of the calibration scans the
   full scoring's.
3. Statistics re-estimation: for each model and the first ``--stats-splits`` splits of the
   largest n, ``calibrate`` (in process) with ``adabn=true`` and, on the first
   ``--map-norm-splits`` splits, ``map_norm=true`` and both, then ``predict`` on the test part
   with the calibrated checkpoint: the test AUROC before/after and specificity/sensitivity at
   the calibrated threshold. (With ``aggregate=topk`` of the window MSE, as in these runs, the
   B-scan score does not read the anomaly map, so ``map_norm`` cannot change a score; the
   map-norm runs check that it does not.)
4. An AdaBN control (``--control-root``, e.g. kermany-mini): AdaBN on normals of the
   training domain, then that domain's test AUROC and mexico-dme's: whether a change seen on
   the new site comes from the site's statistics or from the procedure itself.
5. Aggregates: mean over splits and seeds per method and n, with the sd over splits (mean of
   the per-seed sds) and the sd of the per-seed means; the scatter of the specificity reached
   against sqrt(s(1-s)/n).

Run (from the repository root; every model output is cached under ``--out``, so a rerun only
recomputes the tables)::

    TQDM_DISABLE=1 python experiments/site_calibration.py --runs <runs> \\
        --data ../shared/data/mexico-dme --out <out> --map-norm-splits 5 \\
        --control-root ../shared/data/kermany-mini

(``TQDM_DISABLE=1``: no per-scan progress bars from ``predict``.)

Writes markdown tables to stdout and ``<out>/site_calibration.json`` (every split's numbers,
the splits' patients, the sanity checks, timings).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from anogan_lightning.calibration import rates_at, threshold_at_specificity
from anogan_lightning.evaluation.metrics import auroc as torch_auroc

LABELS = {"NORMAL": 0, "DME": 1}
VARIANTS = {"adabn": (True, False), "map_norm": (False, True), "adabn+map_norm": (True, True)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------
def load_manifest(root: Path) -> list[dict]:
    """The site's scans: absolute path, label (0 NORMAL, 1 DME), patient."""
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {
            "path": str((root / r["file"]).resolve()),
            "label": LABELS[r["label"]],
            "patient": r["patient"],
        }
        for r in rows
    ]


def make_splits(scans: list[dict], n: int, count: int, seed: int) -> list[list[str]]:
    """``count`` calibration parts: whole NORMAL patients in a random order, taken until their
    scans number >= n; each part a sorted list of patient ids."""
    by_patient: dict[str, int] = {}
    for s in scans:
        if s["label"] == 0:
            by_patient[s["patient"]] = by_patient.get(s["patient"], 0) + 1
    patients = sorted(by_patient)
    rng = np.random.default_rng([seed, n])
    splits = []
    for _ in range(count):
        chosen, total = [], 0
        for i in rng.permutation(len(patients)):
            if total >= n:
                break
            chosen.append(patients[i])
            total += by_patient[patients[i]]
        splits.append(sorted(chosen))
    return splits


# -- scoring ----------------------------------------------------------------------------------
def read_predictions(path: Path) -> dict[str, float]:
    """predictions.csv -> {resolved path: score} of the scans scored (status ok)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {str(Path(r["path"]).resolve()): float(r["score"]) for r in rows if r["status"] == "ok"}


def run_predict(ckpt: Path, files: list[str], out: Path, args) -> tuple[dict[str, float], float]:
    """``anogan_lightning.predict`` on ``files`` (cached in ``out``); (scores, seconds)."""
    from anogan_lightning.predict import predict

    csv_path = out / "predictions.csv"
    if not (out / "done").exists():
        t0 = time.time()
        cfg = OmegaConf.create(
            {
                "ckpt": str(ckpt),
                "input": list(files),
                "output_dir": str(out),
                "batch_size": args.batch_size,
                "num_workers": 0,
                "device": args.device,
                "heatmaps": False,
                "max_bscan_heatmaps": 0,
                "threshold": None,
                "spacing_x_um": None,
                "model_card": False,
            }
        )
        predict(cfg)
        (out / "done").write_text(f"{time.time() - t0:.1f}\n")
    return read_predictions(csv_path), float((out / "done").read_text())


def stored_threshold(ckpt: Path) -> float:
    return float(
        torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]["threshold"]
    )


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return torch_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels))


# -- the threshold-only protocol ----------------------------------------------------------------
def split_parts(scans: list[dict], patients: list[str], scores: dict[str, float]):
    """(calibration normals' scores, test scores, test labels, n listed in calibration)."""
    cal = set(patients)
    cal_files = [s["path"] for s in scans if s["patient"] in cal]
    test = [s for s in scans if s["patient"] not in cal and s["path"] in scores]
    cal_scores = np.array([scores[f] for f in cal_files if f in scores])
    return (
        cal_scores,
        np.array([scores[s["path"]] for s in test]),
        np.array([s["label"] for s in test]),
        len(cal_files),
    )


def threshold_only(scans, patients, scores, stored: float, spec: float) -> dict:
    cal, test, labels, n_listed = split_parts(scans, patients, scores)
    thr = threshold_at_specificity(cal, spec)
    at_stored, at_cal = rates_at(test, labels, stored), rates_at(test, labels, thr)
    return {
        "n_cal_listed": n_listed,
        "n_cal": len(cal),
        "n_test_normal": int((labels == 0).sum()),
        "n_test_dme": int((labels == 1).sum()),
        "auroc": auroc(test, labels),
        "threshold": thr,
        "spec_on_cal": float((cal < thr).mean()),
        "spec_stored": at_stored["specificity"],
        "sens_stored": at_stored["sensitivity"],
        "spec_cal": at_cal["specificity"],
        "sens_cal": at_cal["sensitivity"],
    }


def null_scatter(scans: list[dict], splits: list[list[str]], spec: float, reps: int, seed: int):
    """The specificity reached on the test normals if the normal scans' scores were
    independent and identically distributed (no patient effect, no model): the same splits,
    ``reps`` draws of uniform scores; (mean, sd over splits averaged over the draws)."""
    normal = [s for s in scans if s["label"] == 0]
    parts = [np.array([s["patient"] in set(p) for s in normal]) for p in splits]
    rng = np.random.default_rng(seed)
    means, sds = [], []
    for _ in range(reps):
        u = rng.random(len(normal))
        got = [np.mean(u[~c] < threshold_at_specificity(u[c], spec)) for c in parts]
        means.append(np.mean(got))
        sds.append(np.std(got, ddof=1))
    return float(np.mean(means)), float(np.mean(sds))


# -- the real command -------------------------------------------------------------------------
def write_normals_csv(path: Path, scans: list[dict], patients: list[str]) -> list[str]:
    files = [s["path"] for s in scans if s["patient"] in set(patients)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"])
        w.writerows([f] for f in files)
    return files


def calibrate_subprocess(ckpt: Path, normals: Path, out: Path, args) -> float:
    """``python -m anogan_lightning.calibrate`` (cached in ``out``); its wall seconds."""
    if not (out / "calibration.json").exists():
        t0 = time.time()
        cmd = [
            sys.executable,
            "-m",
            "anogan_lightning.calibrate",
            f"ckpt={ckpt}",
            f"normals={normals}",
            f"specificity={args.specificity}",
            "adabn=false",
            "map_norm=false",
            f"device={args.device}",
            f"output_dir={out}",
            f"hydra.run.dir={out}",
            "site=mexico-dme",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        (out / "wall_s").write_text(f"{time.time() - t0:.1f}\n")
    return float((out / "wall_s").read_text())


def calibrate_in_process(ckpt: Path, normals: Path, out: Path, adabn: bool, map_norm: bool, args):
    """``anogan_lightning.calibrate.calibrate`` (cached in ``out``); (record, seconds)."""
    from anogan_lightning.calibrate import calibrate

    if not (out / "calibration.json").exists():
        t0 = time.time()
        cfg = OmegaConf.create(
            {
                "ckpt": str(ckpt),
                "normals": str(normals),
                "specificity": args.specificity,
                "min_normals": 20,
                "adabn": adabn,
                "map_norm": map_norm,
                "site": "mexico-dme",
                "output_dir": str(out),
                "batch_size": args.batch_size,
                "device": args.device,
            }
        )
        calibrate(cfg)
        (out / "wall_s").write_text(f"{time.time() - t0:.1f}\n")
    record = json.loads((out / "calibration.json").read_text())
    return record, float((out / "wall_s").read_text())


def adabn_control(name: str, ckpt: Path, scans: list[dict], mexico: dict, args) -> dict:
    """AdaBN on ``--control-n`` normals of the training domain (``--control-root``: a
    manifest.csv with path, label, split columns, e.g. kermany-mini): whether re-estimating the
    statistics on normals of the very domain the model was trained on leaves its AUROCs (that
    domain's test split, all of mexico-dme) where they were, i.e. whether a change on the new
    site comes from that site's statistics and not from the procedure."""
    root = args.control_root.resolve()
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    normals = [r for r in rows if r["split"] == "train" and r["label"] == "NORMAL"]
    pick = np.random.default_rng(args.split_seed).permutation(len(normals))[: args.control_n]
    d = args.out.resolve() / "control" / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "normals.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"])
        w.writerows([str(root / normals[i]["path"])] for i in sorted(pick))
    test = [
        (str(root / r["path"]), int(r["label"] != "NORMAL")) for r in rows if r["split"] == "test"
    ]
    calibrate_in_process(ckpt, d / "normals.csv", d / "calibrate", True, False, args)
    adapted = d / "calibrate" / "model.ckpt"
    out = {"model": name, "n_normals": len(pick)}
    for tag, model in (("before", ckpt), ("after", adapted)):
        got, _ = run_predict(model, [p for p, _ in test], d / f"test_{tag}", args)
        kept = [(got[p], y) for p, y in test if p in got]
        out[f"domain_test_auroc_{tag}"] = auroc(
            np.array([v for v, _ in kept]), np.array([y for _, y in kept])
        )
    got, _ = run_predict(adapted, [s["path"] for s in scans], d / "mexico_after", args)
    for tag, sc in (("before", mexico), ("after", got)):
        kept = [s for s in scans if s["path"] in sc]
        out[f"mexico_auroc_{tag}"] = auroc(
            np.array([sc[s["path"]] for s in kept]), np.array([s["label"] for s in kept])
        )
    return out


# -- aggregation ------------------------------------------------------------------------------
def summary(records: list[dict], key: str) -> dict:
    """mean over every (seed, split); sd over splits (mean of the per-seed sds); sd of the
    per-seed means."""
    seeds = sorted({r["seed"] for r in records})
    per = [np.array([r[key] for r in records if r["seed"] == s], dtype=float) for s in seeds]
    per = [p[np.isfinite(p)] for p in per]
    allv = np.concatenate(per) if per else np.array([])
    sd_split = [p.std(ddof=1) for p in per if len(p) > 1]
    means = [p.mean() for p in per if len(p)]
    return {
        "mean": float(allv.mean()) if len(allv) else math.nan,
        "sd_splits": float(np.mean(sd_split)) if sd_split else math.nan,
        "sd_seeds": float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
        "n_seeds": len(means),
        "n_values": int(len(allv)),
    }


def fmt(s: dict, digits: int = 3) -> str:
    if not math.isfinite(s["mean"]):
        return "n/a"
    out = f"{s['mean']:.{digits}f}"
    if math.isfinite(s["sd_splits"]):
        out += f" ± {s['sd_splits']:.{digits}f}"
    if math.isfinite(s["sd_seeds"]):
        out += f" [{s['sd_seeds']:.{digits}f}]"
    return out


def by_method_and_n(records: list[dict], args):
    """(method, n, its records) for every method and calibration size that has records."""
    for method in args.methods:
        for n in args.sizes:
            rs = [r for r in records if r["method"] == method and r["n"] == n]
            if rs:
                yield method, n, rs


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="folder of <method>_s<seed> runs")
    p.add_argument("--methods", nargs="+", default=["denoising_autoencoder", "autoencoder"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=Path("../shared/data/mexico-dme"))
    p.add_argument("--out", type=Path, required=True, help="cache and outputs")
    p.add_argument("--specificity", type=float, default=0.95)
    p.add_argument("--sizes", nargs="+", type=int, default=[20, 50])
    p.add_argument("--splits", type=int, default=20, help="random splits per calibration size")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument(
        "--stats-splits", type=int, default=5, help="splits (largest n) for adabn; 0: none"
    )
    p.add_argument(
        "--map-norm-splits",
        type=int,
        default=1,
        help="splits (largest n) for map_norm and adabn+map_norm (a check that the score is "
        "unchanged); 0: none",
    )
    p.add_argument(
        "--null-reps", type=int, default=500, help="draws of the iid-score reference scatter"
    )
    p.add_argument(
        "--control-root",
        type=Path,
        default=None,
        help="training-domain data (manifest.csv with path, label, split) for the AdaBN "
        "control: AdaBN on its train normals, AUROC on its test split and on mexico-dme",
    )
    p.add_argument("--control-n", type=int, default=50, help="normals of the AdaBN control")
    p.add_argument("--no-sanity", action="store_true", help="skip the real calibrate command")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scans = load_manifest(args.data.resolve())
    all_files = [s["path"] for s in scans]
    labels_all = np.array([s["label"] for s in scans])
    n_big = max(args.sizes)
    splits = {n: make_splits(scans, n, args.splits, args.split_seed) for n in args.sizes}
    spec = args.specificity

    models, records, sanity, stats, timings, controls = [], [], [], [], [], []
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            run = args.runs / name
            ckpt = run / "checkpoints" / "model.ckpt"
            if not ckpt.is_file():
                log(f"{name}: no checkpoint, skipped")
                continue
            stored = stored_threshold(ckpt)
            log(f"{name}: scoring the {len(all_files)} scans")
            scores, secs = run_predict(ckpt, all_files, out / "scores" / name, args)
            timings.append({"model": name, "what": "predict all", "s": secs})
            ok = np.array([f in scores for f in all_files])
            s_all = np.array([scores.get(f, math.nan) for f in all_files])
            res_json = run / "results.json"
            ref = json.loads(res_json.read_text()) if res_json.is_file() else {}
            models.append(
                {
                    "model": name,
                    "method": method,
                    "seed": seed,
                    "stored_threshold": stored,
                    "n_scored": int(ok.sum()),
                    "n_unscored": int((~ok).sum()),
                    "auroc_all": auroc(s_all[ok], labels_all[ok]),
                    **rates_at(s_all[ok], labels_all[ok], stored),
                    "results_json": {
                        k: ref.get(k)
                        for k in (
                            "val/youden_threshold",
                            "val/auroc",
                            "test/auroc",
                            "test_mexico/auroc",
                            "test_mexico/specificity_at_val_threshold",
                            "test_mexico/sensitivity_at_val_threshold",
                        )
                    },
                }
            )
            for n in args.sizes:
                for k, patients in enumerate(splits[n]):
                    r = threshold_only(scans, patients, scores, stored, spec)
                    records.append(
                        {"model": name, "method": method, "seed": seed, "n": n, "split": k, **r}
                    )

            # the shortcut against the real command, once per model
            if not args.no_sanity:
                d = out / "sanity" / name
                files = write_normals_csv(d / "normals.csv", scans, splits[n_big][0])
                secs = calibrate_subprocess(ckpt, d / "normals.csv", d / "calibrate", args)
                timings.append({"model": name, "what": "calibrate (subprocess)", "s": secs})
                rec = json.loads((d / "calibrate" / "calibration.json").read_text())
                cal_scores = read_predictions(d / "calibrate" / "scores.csv")
                mine = threshold_at_specificity(
                    np.array([scores[f] for f in files if f in scores]), spec
                )
                diffs = [abs(cal_scores[f] - scores[f]) for f in cal_scores if f in scores]
                sanity.append(
                    {
                        "model": name,
                        "split": 0,
                        "n": n_big,
                        "n_scored": rec["n_scored"],
                        "threshold_numpy": mine,
                        "threshold_calibrate": rec["threshold"],
                        "abs_diff": abs(mine - rec["threshold"]),
                        "equal_1e-9": abs(mine - rec["threshold"]) <= 1e-9,
                        "max_abs_score_diff": max(diffs) if diffs else math.nan,
                        "same_scans": sorted(cal_scores) == sorted(f for f in files if f in scores),
                    }
                )

            if args.control_root is not None:
                log(f"{name}: AdaBN control on {args.control_root}")
                controls.append(adabn_control(name, ckpt, scans, scores, args))

            # statistics re-estimation
            jobs = [("adabn", k) for k in range(min(args.stats_splits, args.splits))]
            for v in ("map_norm", "adabn+map_norm"):
                jobs += [(v, k) for k in range(min(args.map_norm_splits, args.splits))]
            for variant, k in jobs:
                patients = splits[n_big][k]
                d = out / "stats" / name / f"n{n_big}_split{k}"
                write_normals_csv(d / "normals.csv", scans, patients)
                adabn, map_norm = VARIANTS[variant]
                log(f"{name}: {variant}, split {k}: calibrate + predict")
                rec, s_cal = calibrate_in_process(
                    ckpt, d / "normals.csv", d / variant / "calibrate", adabn, map_norm, args
                )
                test_scans = [s for s in scans if s["patient"] not in set(patients)]
                new, s_pred = run_predict(
                    d / variant / "calibrate" / "model.ckpt",
                    [s["path"] for s in test_scans],
                    d / variant / "predict",
                    args,
                )
                timings.append({"model": name, "what": f"{variant} calibrate", "s": s_cal})
                timings.append({"model": name, "what": f"{variant} predict test", "s": s_pred})
                both = [s for s in test_scans if s["path"] in new and s["path"] in scores]
                lab = np.array([s["label"] for s in both])
                after = np.array([new[s["path"]] for s in both])
                before = np.array([scores[s["path"]] for s in both])
                thr = float(rec["threshold"])
                at = rates_at(after, lab, thr)
                base = threshold_only(scans, patients, scores, stored, spec)
                stats.append(
                    {
                        "model": name,
                        "method": method,
                        "seed": seed,
                        "variant": variant,
                        "n": n_big,
                        "split": k,
                        "n_cal": rec["n_scored"],
                        "n_test": len(both),
                        "auroc_before": auroc(before, lab),
                        "auroc_after": auroc(after, lab),
                        "delta_auroc": auroc(after, lab) - auroc(before, lab),
                        "threshold": thr,
                        "spec_cal": at["specificity"],
                        "sens_cal": at["sensitivity"],
                        "spec_cal_thr_only": base["spec_cal"],
                        "sens_cal_thr_only": base["sens_cal"],
                        "max_abs_score_change": float(np.abs(after - before).max()),
                        "statistics": rec["statistics"],
                    }
                )

    nulls = {n: null_scatter(scans, splits[n], spec, args.null_reps, n) for n in args.sizes}
    report = render(args, nulls, models, records, sanity, stats, controls)
    print(report)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "splits": {str(n): s for n, s in splits.items()},
        "iid_null_spec_mean_sd": {str(n): v for n, v in nulls.items()},
        "models": models,
        "threshold_only": records,
        "sanity": sanity,
        "statistics": stats,
        "adabn_control": controls,
        "timings": timings,
        "wall_s_this_invocation": time.time() - t_start,
    }
    path = out / "site_calibration.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    (out / "site_calibration.md").write_text(report + "\n")
    log(f"wrote {path}")


def render(args, nulls, models, records, sanity, stats, controls) -> str:
    spec = args.specificity
    parts = [
        f"Site calibration on mexico-dme (target specificity {spec}; {args.splits} "
        "patient-grouped splits per n; cells: mean ± sd over splits [sd of the seed means])"
    ]
    parts.append("\n### Models on all scans (stored Kermany threshold)\n")
    rows = []
    for m in models:
        ref = m["results_json"]
        rows.append(
            [
                m["model"],
                f"{m['stored_threshold']:.5g}",
                f"{m['n_scored']} ({m['n_unscored']} unscored)",
                f"{m['auroc_all']:.3f}",
                "n/a"
                if ref.get("test_mexico/auroc") is None
                else f"{ref['test_mexico/auroc']:.3f}",
                f"{m['specificity']:.3f}",
                f"{m['sensitivity']:.3f}",
            ]
        )
    parts.append(
        table(
            [
                "model",
                "stored threshold",
                "scans scored",
                "AUROC (200 scans)",
                "AUROC results.json",
                "spec @ stored",
                "sens @ stored",
            ],
            rows,
        )
    )

    parts.append("\n### Threshold-only calibration, per method\n")
    rows = []
    for method, n, rs in by_method_and_n(records, args):
        seeds = sorted({r["seed"] for r in rs})
        within = np.mean([abs(r["spec_cal"] - spec) <= 0.05 for r in rs])
        rows.append(
            [
                method,
                n,
                f"{len(seeds)} x {len(rs) // len(seeds)}",
                fmt(summary(rs, "n_cal"), 1),
                fmt(summary(rs, "auroc")),
                fmt(summary(rs, "spec_stored")),
                fmt(summary(rs, "sens_stored")),
                fmt(summary(rs, "spec_cal")),
                f"{within:.2f}",
                fmt(summary(rs, "sens_cal")),
            ]
        )
    parts.append(
        table(
            [
                "method",
                "n",
                "seeds x splits",
                "calibration scans",
                "test AUROC",
                "spec @ stored",
                "sens @ stored",
                f"spec @ calibrated (target {spec})",
                "share within 0.05",
                "sens @ calibrated",
            ],
            rows,
        )
    )

    parts.append("\n### Threshold-only calibration, per model\n")
    rows = []
    for m in models:
        for n in args.sizes:
            rs = [r for r in records if r["model"] == m["model"] and r["n"] == n]
            if not rs:
                continue

            def ms(key, rs=rs):
                v = np.array([r[key] for r in rs], dtype=float)
                return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"

            rows.append(
                [
                    m["model"],
                    n,
                    len(rs),
                    ms("auroc"),
                    ms("spec_stored"),
                    ms("sens_stored"),
                    ms("spec_cal"),
                    ms("sens_cal"),
                    ms("threshold"),
                ]
            )
    parts.append(
        table(
            [
                "model",
                "n",
                "splits",
                "test AUROC",
                "spec @ stored",
                "sens @ stored",
                "spec @ calibrated",
                "sens @ calibrated",
                "calibrated threshold",
            ],
            rows,
        )
    )

    parts.append("\n### How many normals: scatter of the specificity reached\n")
    parts.append(
        "sd over splits: the spread of the test specificity at the calibrated threshold over "
        "the splits of one model (mean over seeds); iid null: the same splits with independent, "
        "identically distributed scores (the scatter the calibration's and the test part's "
        "sampling alone give, finite population of normals included).\n"
    )
    rows = []
    for method, n, rs in by_method_and_n(records, args):
        s_cal = summary(rs, "spec_cal")
        n_cal = float(np.mean([r["n_cal"] for r in rs]))
        m_test = float(np.mean([r["n_test_normal"] for r in rs]))
        null_mean, null_sd = nulls[n]
        rows.append(
            [
                method,
                n,
                f"{n_cal:.1f}",
                f"{m_test:.1f}",
                f"{s_cal['mean']:.3f}",
                f"{s_cal['mean'] - spec:+.3f}",
                f"{s_cal['sd_splits']:.3f}",
                f"{math.sqrt(spec * (1 - spec) / n_cal):.3f}",
                f"{null_mean:.3f}",
                f"{null_sd:.3f}",
                f"{np.mean([abs(r['spec_cal'] - spec) <= 0.05 for r in rs]):.2f}",
                f"{np.mean([r['spec_cal'] < spec - 0.05 for r in rs]):.2f}",
            ]
        )
    parts.append(
        table(
            [
                "method",
                "n",
                "calibration scans (mean)",
                "test normals (mean)",
                "spec reached",
                "bias",
                "sd over splits",
                "sqrt(s(1-s)/n)",
                "iid null: spec reached",
                "iid null: sd over splits",
                "share within 0.05",
                "share below target - 0.05",
            ],
            rows,
        )
    )

    if sanity:
        parts.append("\n### The numpy shortcut against the real calibrate command\n")
        parts.append(
            table(
                [
                    "model",
                    "split",
                    "normals scored",
                    "numpy threshold",
                    "calibrate threshold",
                    "abs diff",
                    "<= 1e-9",
                    "max abs score diff",
                    "same scans",
                ],
                [
                    [
                        s["model"],
                        f"n{s['n']} #{s['split']}",
                        s["n_scored"],
                        f"{s['threshold_numpy']:.10g}",
                        f"{s['threshold_calibrate']:.10g}",
                        f"{s['abs_diff']:.2e}",
                        s["equal_1e-9"],
                        f"{s['max_abs_score_diff']:.2e}",
                        s["same_scans"],
                    ]
                    for s in sanity
                ],
            )
        )

    if stats:
        parts.append("\n### Statistics re-estimation (calibrated checkpoint, test part)\n")
        rows = []
        for method in args.methods:
            for variant in VARIANTS:
                rs = [r for r in stats if r["method"] == method and r["variant"] == variant]
                if not rs:
                    continue
                seeds = sorted({r["seed"] for r in rs})
                rows.append(
                    [
                        method,
                        variant,
                        f"{len(seeds)} x {len(rs) // len(seeds)}",
                        fmt(summary(rs, "auroc_before")),
                        fmt(summary(rs, "auroc_after")),
                        fmt(summary(rs, "delta_auroc")),
                        fmt(summary(rs, "spec_cal_thr_only")),
                        fmt(summary(rs, "sens_cal_thr_only")),
                        fmt(summary(rs, "spec_cal")),
                        fmt(summary(rs, "sens_cal")),
                        f"{max(r['max_abs_score_change'] for r in rs):.3g}",
                    ]
                )
        parts.append(
            table(
                [
                    "method",
                    "variant",
                    "seeds x splits",
                    "AUROC before",
                    "AUROC after",
                    "Δ AUROC",
                    "spec @ cal (threshold only)",
                    "sens @ cal (threshold only)",
                    "spec @ cal (variant)",
                    "sens @ cal (variant)",
                    "max score change",
                ],
                rows,
            )
        )
        parts.append("\nPer model (mean over its splits):\n")
        rows = []
        for m in models:
            for variant in VARIANTS:
                rs = [r for r in stats if r["model"] == m["model"] and r["variant"] == variant]
                if not rs:
                    continue

                def mean(key, rs=rs):
                    return f"{np.mean([r[key] for r in rs]):.3f}"

                rows.append(
                    [
                        m["model"],
                        variant,
                        len(rs),
                        mean("auroc_before"),
                        mean("auroc_after"),
                        mean("spec_cal"),
                        mean("sens_cal"),
                    ]
                )
        parts.append(
            table(
                [
                    "model",
                    "variant",
                    "splits",
                    "AUROC before",
                    "AUROC after",
                    "spec @ cal",
                    "sens @ cal",
                ],
                rows,
            )
        )
    if controls:
        parts.append(
            f"\n### AdaBN control: re-estimated on {args.control_n} training-domain normals "
            f"({args.control_root.name})\n"
        )
        parts.append(
            table(
                ["model", "domain test AUROC before", "after", "mexico AUROC before", "after"],
                [
                    [
                        c["model"],
                        f"{c['domain_test_auroc_before']:.3f}",
                        f"{c['domain_test_auroc_after']:.3f}",
                        f"{c['mexico_auroc_before']:.3f}",
                        f"{c['mexico_auroc_after']:.3f}",
                    ]
                    for c in controls
                ],
            )
        )
    return "\n".join(parts)


if __name__ == "__main__":
    main()
