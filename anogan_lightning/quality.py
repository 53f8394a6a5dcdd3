"""The seeded quality benchmark: ``anogan-lightning quality [options]`` (= ``make quality``,
``python -m anogan_lightning.quality``).

Trains every method named (default: every ``conf/method/*.yaml``) for N seeds under one time
budget on one dataset, then compares them: ``quality.md`` and ``quality.csv`` in the output
folder, with the per-run ``report.md`` / ``report.csv`` beside them.

It is the ordinary machinery, not a second pipeline: each job is one
``python -m anogan_lightning.train -m +method=<m> seed=<k> <overrides>`` in a fixed sweep folder
(``<out>/sweep/<m>_seed<k>``), one thread each (``OMP_NUM_THREADS=1``), ``--jobs`` at a time;
a job whose folder already holds a finished ``results.json`` is skipped (the entry point's
``skip_finished`` test), so a rerun resumes where the last one stopped; a failed job leaves
``error.txt`` in its folder and is listed with that reason, the others go on;
``--summary-only`` writes the tables from the jobs finished so far and starts none (a run cut
short, or seeds still running elsewhere). ``--first-seed K`` runs seeds K..K+N-1 instead of
0..N-1; the tables count every ``<m>_seed<k>`` folder of the benchmarked methods in the sweep
folder, so seeds added later (or run on another machine and copied in) join them. The tables come
from :mod:`anogan_lightning.report` (run records, seed aggregation, paired differences).

Defaults (the issue 11 protocol): ``data=kermany data.root=../shared/data/kermany-mini
data.image_size=64 data.val_normal=256 data.val_abnormal=256``, ``trainer.max_time=00:00:12:00``
with ``trainer.max_epochs=-1`` (the budget alone ends the fit; f-AnoGAN ends itself after its
stages), 3 seeds, reference method ``autoencoder``. Extra overrides are appended to every job
and replace a default with the same key; a ``method.<key>=...`` override reaches only the
methods whose config has that key.

GAN_R (issue 11, item 5): when both ``anogan`` and ``ganr`` are benchmarked, the ``ganr`` job
of seed k maps the networks of the ``anogan`` job of seed k (``method.from_checkpoint``, the
paper's same-GAN comparison: it waits for that job and trains nothing); ``--ganr-alone`` trains
GAN_R's own GAN under the budget instead.

The difference to the reference: for each method, the mean over seeds of
AUROC(method, seed k) - AUROC(reference, seed k), both runs of a pair scored on the same test
images (``scores.csv`` rows matched by id), with a 95% CI from a bootstrap that resamples the
test images (stratified by class, one draw shared by all runs when they share the test set)
and the seed pairs (:func:`anogan_lightning.evaluation.metrics.pooled_paired_difference`): it
covers both the test set's sampling noise and the run-to-run spread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from anogan_lightning import artefacts, available_methods, method_config, report
from anogan_lightning.evaluation import metrics

#: the folder that holds this package (a checkout, or site-packages): put first on the jobs'
#: path, so that they run the same code as this process
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
#: Kermany's layout; relative to the directory the command is started in (a checkout beside
#: ../shared/data)
DEFAULT_DATA_ROOT = "../shared/data/kermany-mini"

KERMANY_DEFAULTS = {
    "data.image_size": "64",
    "data.val_normal": "256",
    "data.val_abnormal": "256",
    "data.num_workers": "0",
}
COMMON_DEFAULTS = {
    "trainer.max_epochs": "-1",
    "trainer.enable_progress_bar": "false",
    "logger": "csv",
}
METHOD_DEFAULTS = {"method.progress": "false"}  # AnoGAN / GAN_R: no per-image mapping bar


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _method_key(key: str) -> str | None:
    """The method config key an override key sets (``method.width`` -> ``width``), else None."""
    return key.split(".", 1)[1].split(".")[0] if key.startswith("method.") else None


@functools.cache
def method_keys(method: str) -> frozenset[str]:
    """The keys of a method's composed config (its defaults lists merged)."""
    return frozenset(method_config(method))


def job_overrides(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    """The overrides of one job: defaults, then the user's extras (replacing equal keys); a
    ``method.<key>`` override only where the method has that key."""
    settings = {"data": f"data={args.data}"}
    if args.data_root:
        settings["data.root"] = f"data.root={Path(args.data_root).expanduser().resolve()}"
    if args.data == "kermany":
        settings |= {k: f"{k}={v}" for k, v in KERMANY_DEFAULTS.items()}
    settings |= {k: f"{k}={v}" for k, v in COMMON_DEFAULTS.items()}
    settings["trainer.max_time"] = f"trainer.max_time={args.budget}"
    settings |= {k: f"{k}={v}" for k, v in METHOD_DEFAULTS.items()}
    for o in args.overrides:
        settings[_key(o)] = o
    keys = method_keys(method)
    kept = [o for k, o in settings.items() if _method_key(k) in (None, *keys)]
    return [f"+method={method}", f"seed={seed}", *kept]


def run_job(job: dict, sweep: Path, log, done: dict[str, threading.Event] | None = None) -> dict:
    """One job: skipped when finished, else ``python -m anogan_lightning.train -m ...``; a job
    with ``after`` (GAN_R on AnoGAN's networks) waits for that job and fails without its
    checkpoint. ``done[name]`` is set when the job ``name`` has ended, however it ended."""
    try:
        return _run_job(job, sweep, log, done or {})
    finally:
        if done and job["name"] in done:
            done[job["name"]].set()


def _run_job(job: dict, sweep: Path, log, done: dict[str, threading.Event]) -> dict:
    out = sweep / job["name"]
    tag = f"[{job['index']}/{job['total']}] {job['method']} seed {job['seed']}"
    if job.get("after") in done:
        done[job["after"]].wait()
    if job.get("checkpoint") and not Path(job["checkpoint"]).is_file():
        out.mkdir(parents=True, exist_ok=True)
        reason = f"{job['after']} did not finish: no AnoGAN checkpoint {job['checkpoint']} to map"
        (out / "error.txt").write_text(reason + "\n")
        log(f"{tag}: FAILED: {reason}")
        return job | {"returncode": None}
    done_results = artefacts.read_finished(out)
    if done_results is not None:
        log(f"{tag}: already finished, skipped ({_outcome(done_results)})")
        return job | {"skipped": True}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p
        ),
        "OMP_NUM_THREADS": "1",  # torch takes its intra-op thread count from it
        "MKL_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    cmd = [sys.executable, "-m", "anogan_lightning.train", "-m", *job["overrides"]]
    cmd += [f"hydra.sweep.dir={sweep}", f"hydra.sweep.subdir={job['name']}"]
    log(f"{tag}: started")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality_job.log", "w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    minutes = (time.perf_counter() - t0) / 60
    rec = report.load_run(out)
    if rec["status"] == "finished":
        log(f"{tag}: finished in {minutes:.1f} min ({_outcome(rec['results'])})")
    else:
        log(f"{tag}: {rec['status'].upper()} after {minutes:.1f} min: {rec['reason']}")
    return job | {"returncode": proc.returncode}


def _outcome(results: dict) -> str:
    if results.get("status") == "incomplete":
        return f"incomplete: {results.get('reason')}"
    epochs = results.get("train/epochs")
    return f"test AUROC {results['test/auroc']:.3f}" + (
        f", {epochs} epochs" if epochs is not None else ""
    )


# -- the comparison --------------------------------------------------------------------------
def job_name(method: str, seed: int) -> str:
    """A job's folder in the sweep: ``<method>_seed<k>``."""
    return f"{method}_seed{seed}"


def with_other_seeds(sweep: Path, jobs: list[dict]) -> list[dict]:
    """``jobs`` plus the folders ``<method>_seed<k>`` of the same methods that an earlier
    command left in ``sweep`` for other seeds (``--first-seed``); methods in the order of
    ``jobs``, seeds in increasing order within each."""
    names = {j["name"] for j in jobs}
    methods = list(dict.fromkeys(j["method"] for j in jobs))
    found = list(jobs)
    for method in methods:
        prefix = job_name(method, "")
        for path in sweep.glob(f"{prefix}*"):
            seed = path.name[len(prefix) :]
            if seed.isdigit() and path.name not in names and path.is_dir():
                found.append({"method": method, "seed": int(seed), "name": path.name})
    return sorted(found, key=lambda j: (methods.index(j["method"]), j["seed"]))


def _stat(values: list) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    return report.mean_std(values) if values else None


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60


def _ms(stat, digits: int = 3) -> str:
    return "" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def summarise(sweep: Path, jobs: list[dict], reference: str) -> list[dict]:
    """One row per method: counts, mean ± std of the AUROCs over seeds, training reached,
    time, and the seed-paired difference to the reference."""
    records = {}
    for job in jobs:
        out = sweep / job["name"]
        records[job["name"]] = report.load_run(out) if out.is_dir() else None
    ok = {n: r for n, r in records.items() if r is not None and r["status"] == "finished"}
    rows = []
    for method in dict.fromkeys(j["method"] for j in jobs):
        mine = [j for j in jobs if j["method"] == method]
        runs = [(j, ok[j["name"]]) for j in mine if j["name"] in ok]
        res = [r["results"] for _, r in runs]
        failed = []
        for j in mine:
            if j["name"] in ok:
                continue
            rec = records[j["name"]]
            reason = rec["reason"] if rec is not None else "did not run"
            failed.append((j["seed"], reason, sweep / j["name"]))
        row = {
            "method": method,
            "n_runs": len(mine),
            "n_finished": len(runs),
            "failed": failed,
            "seeds": [j["seed"] for j, _ in runs],
            "test_auroc_per_seed": [r["test/auroc"] for r in res],
            "test_auroc": _stat([r["test/auroc"] for r in res]),
            "val_auroc": _stat([r.get("val/auroc") for r in res]),
            "epochs": _stat([r.get("train/epochs") for r in res]),
            "steps": _stat([r.get("train/steps") for r in res]),
            "train_min": _stat([_minutes(r.get("time/fit_s")) for r in res]),
            "wall_min": _stat([_minutes(r.get("time/total_s")) for r in res]),
        }
        classes = sorted({k for r in res for k in r if k.startswith("test/auroc/")})
        classes = [k for k in classes if not metrics.is_ci(k)]
        row["classes"] = {
            k.removeprefix("test/auroc/"): _stat([r.get(k) for r in res]) for k in classes
        }
        comps = sorted({k for r in res for k in r if k.startswith("test/auroc_")})
        comps = [k for k in comps if not metrics.is_ci(k)]
        row["components"] = {
            k.removeprefix("test/auroc_"): _stat([r.get(k) for r in res]) for k in comps
        }
        row["runs"] = runs
        rows.append(row)
    ref = next((r for r in rows if r["method"] == reference), None)
    for row in rows:
        row["delta"] = _difference(row, ref) if ref is not None else None
    return rows


def _difference(row: dict, ref: dict) -> tuple[float, float, float, int] | None:
    """Mean over seeds of AUROC(method, k) - AUROC(reference, k), with its bootstrap CI."""
    ref_by_seed = {j["seed"]: r for j, r in ref["runs"]}
    pairs = []
    for j, r in row["runs"]:
        if j["seed"] not in ref_by_seed:
            continue
        a, b = report.read_scores(r["run"]), report.read_scores(ref_by_seed[j["seed"]]["run"])
        m = report.matched_scores(a, b) if a and b else None
        if m is not None:
            pairs.append(m)
    if not pairs:
        return None
    same = all(m[0] == pairs[0][0] and bool((m[3] == pairs[0][3]).all()) for m in pairs)
    diff, low, high = metrics.pooled_paired_difference(
        [(sa, sb, y) for _, sa, sb, y in pairs], same_images=same
    )
    return diff, low, high, len(pairs)


def write_markdown(path: Path, rows: list[dict], args: argparse.Namespace, cmd: str) -> None:
    ref = args.reference
    classes = sorted({c for r in rows for c in r["classes"]})
    head = [
        "method",
        "runs",
        "test AUROC (mean ± std)",
        "per seed",
        "val AUROC",
        f"Δ vs {ref} [95% CI]",
        *[f"test AUROC {c}" for c in classes],
        "components (mean test AUROC)",
        "epochs",
        "steps",
        "training (min)",
        "wall (min)",
    ]
    lines = [
        f"# Quality benchmark: {args.out}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Data: `{args.data}`"
        + (f" at `{args.data_root}`" if args.data_root else "")
        + f"; budget `trainer.max_time={args.budget}` per job, one thread per job, "
        + (
            "tables of the finished jobs only"
            if args.summary_only
            else f"{args.jobs} job(s) at a time"
        )
        + f"; seeds {', '.join(map(str, sorted({s for r in rows for s in r['seeds']})))}"
        + (f"; extra overrides `{' '.join(args.overrides)}`" if args.overrides else "")
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        d = r["delta"]
        if d is not None:
            delta = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] ({d[3]} seed pairs)"
        else:
            delta = "" if r["method"] != ref else "(reference)"
        per_seed = ", ".join(f"{v:.3f}" for v in r["test_auroc_per_seed"])
        cells = [
            r["method"],
            f"{r['n_finished']}/{r['n_runs']}",
            _ms(r["test_auroc"]),
            per_seed,
            _ms(r["val_auroc"]),
            delta,
            *[_ms(r["classes"].get(c)) for c in classes],
            ", ".join(f"{k} {v[0]:.3f}" for k, v in r["components"].items() if v),
            _ms(r["epochs"], 0),
            _ms(r["steps"], 0),
            _ms(r["train_min"], 1),
            _ms(r["wall_min"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Δ: mean over seeds of test AUROC(method, seed k) − test AUROC({ref}, seed k), both "
        "scored on the same test images (scores.csv rows matched by id); 95% CI from "
        f"{metrics.N_BOOT} bootstrap resamples of the test images (stratified by class, "
        "shared by all runs on one test set) and of the seed pairs. An interval that excludes "
        "0 is a difference larger than the test-set noise and the seed-to-seed spread. "
        "Per-class AUROC: each disease class against all normals.",
    ]
    failed = [(r["method"], *f) for r in rows for f in r["failed"]]
    if failed:
        lines += ["", f"Failed or incomplete jobs ({len(failed)}):", ""]
        lines += [f"- {m} seed {s} ({d}): {reason}" for m, s, reason, d in failed]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    classes = sorted({c for r in rows for c in r["classes"]})
    comps = sorted({c for r in rows for c in r["components"]})

    def ms(stat) -> list[str]:
        return ["", ""] if stat is None else [f"{stat[0]:.6g}", f"{stat[1]:.6g}"]

    head = ["method", "n_runs", "n_finished", "test_auroc_mean", "test_auroc_std"]
    head += ["test_auroc_per_seed", "val_auroc_mean", "val_auroc_std"]
    head += ["delta_vs_reference", "delta_ci_low", "delta_ci_high", "delta_seed_pairs"]
    for c in classes:
        head += [f"test_auroc/{c}_mean", f"test_auroc/{c}_std"]
    for c in comps:
        head += [f"test_auroc_{c}_mean", f"test_auroc_{c}_std"]
    head += ["epochs_mean", "epochs_std", "steps_mean", "steps_std"]
    head += ["train_min_mean", "train_min_std", "wall_min_mean", "wall_min_std", "failed"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in rows:
            d = r["delta"]
            row = [r["method"], r["n_runs"], r["n_finished"], *ms(r["test_auroc"])]
            row += [" ".join(f"{v:.6g}" for v in r["test_auroc_per_seed"]), *ms(r["val_auroc"])]
            row += [f"{v:.6g}" for v in d[:3]] + [d[3]] if d else ["", "", "", ""]
            for c in classes:
                row += ms(r["classes"].get(c))
            for c in comps:
                row += ms(r["components"].get(c))
            for k in ("epochs", "steps", "train_min", "wall_min"):
                row += ms(r[k])
            row.append("; ".join(f"seed {s}: {reason}" for s, reason, _ in r["failed"]))
            w.writerow(row)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    ap.add_argument("--methods", default="all", help="comma-separated (default: every method)")
    ap.add_argument("--data", default="kermany", help="data group (default kermany)")
    ap.add_argument(
        "--data-root",
        default=DEFAULT_DATA_ROOT,
        help="dataset folder (kermany layout: train/, test/ with class folders); '' for none",
    )
    ap.add_argument("--budget", default="00:00:12:00", help="trainer.max_time per job")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds K..K+N-1 instead (default 0): add seeds to a benchmark, or split one "
        "over machines; the tables cover every finished seed in --out",
    )
    ap.add_argument("--jobs", type=int, default=1, help="jobs at a time, one thread each")
    ap.add_argument("--out", type=Path, default=Path("outputs/quality"), help="output folder")
    ap.add_argument("--reference", default="autoencoder", help="method to compare against")
    ap.add_argument(
        "--ganr-alone",
        action="store_true",
        help="train GAN_R's own GAN instead of mapping the same seed's AnoGAN networks",
    )
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="write the tables from the jobs that have finished; start no job",
    )
    args = ap.parse_args(argv)
    if args.data != "kermany" and args.data_root == ap.get_default("data_root"):
        args.data_root = ""
    methods = available_methods() if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {available_methods()}")
    if args.data_root and not Path(args.data_root).expanduser().is_dir():
        ap.error(f"--data-root {args.data_root} is not a folder")
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    if args.first_seed < 0:
        ap.error("--first-seed must be >= 0")
    args.method_list = methods
    for o in args.overrides:  # a method.<key> override is applied only where the key exists
        name = _method_key(_key(o))
        if name is not None and not any(name in method_keys(m) for m in methods):
            ap.error(
                f"override {o!r}: no benchmarked method has the key {name!r} in its "
                f"config ({', '.join(methods)}), so no job would get it"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    sweep = out / "sweep"
    sweep.mkdir(parents=True, exist_ok=True)
    # what the jobs' results depend on; more methods or seeds may be added to a folder later
    settings = {k: getattr(args, k) for k in ("data", "data_root", "budget", "overrides")}
    if args.ganr_alone:  # absent otherwise: folders from before the option stay valid
        settings["ganr_alone"] = True
    stored = out / "quality.json"
    if stored.is_file() and json.loads(stored.read_text()) != json.loads(json.dumps(settings)):
        print(
            f"error: {out} holds a benchmark with other settings ({stored}); "
            "use another --out, or delete the folder to start over",
            file=sys.stderr,
        )
        return 2
    stored.write_text(json.dumps(settings, indent=2) + "\n")

    jobs = []  # seed-major: a run cut short has every method at its first seeds
    methods = list(args.method_list)
    paired = "anogan" in methods and "ganr" in methods and not args.ganr_alone
    if paired:  # GAN_R maps the AnoGAN run's networks: last within each seed, so that a
        # worker picks it up when AnoGAN has most likely finished instead of idling beside it
        methods.remove("ganr")
        methods.append("ganr")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in methods:
            job = {
                "method": method,
                "seed": seed,
                "name": job_name(method, seed),
                "overrides": job_overrides(args, method, seed),
            }
            if paired and method == "ganr":  # the paper's comparison: same GAN, other score
                job["after"] = job_name("anogan", seed)
                job["checkpoint"] = str(sweep / job["after"] / "checkpoints" / "model.ckpt")
                job["overrides"].append(f"method.from_checkpoint={job['checkpoint']}")
            jobs.append(job)
    for i, job in enumerate(jobs, 1):
        job["index"], job["total"] = i, len(jobs)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    log(f"{len(jobs)} jobs ({len(args.method_list)} methods x {args.seeds} seeds) in {sweep}")
    if not args.summary_only:
        done = {j["name"]: threading.Event() for j in jobs}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: run_job(j, sweep, log, done), jobs))

    rows = summarise(sweep, with_other_seeds(sweep, jobs), args.reference)
    cmd = "anogan-lightning quality " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(out / "quality.md", rows, args, cmd.strip())
    write_csv(out / "quality.csv", rows)
    try:  # the per-run table beside it
        try:
            report.report([sweep], out, reference=args.reference)
        except ValueError:  # no finished reference run: the table without differences
            report.report([sweep], out)
    except FileNotFoundError as err:
        log(f"report.md not written: {err}")
    print((out / "quality.md").read_text())
    n_failed = sum(len(r["failed"]) for r in rows)
    log(f"wrote {out / 'quality.md'} and {out / 'quality.csv'}; {n_failed} job(s) failed")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
