"""Entry point: ``python -m anogan_lightning.train +method=<name> [overrides]``.

Seeds, instantiates data / method / trainer / loggers from the Hydra config, checks every test
set (``data`` and ``extra_test``) before training, fits on normal images, validates (which fixes
the decision threshold), tests, and writes the run's artefacts into the Hydra run directory. A
test split that cannot be scored (``<split>/status: not_scored`` in results.json, e.g. one class
only) ends the run with a one-line error after its files are written.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from anogan_lightning import artefacts, available_methods, extras, provenance, runtime
from anogan_lightning.evaluation import figures, metrics
from anogan_lightning.methods.base import DivergenceError, check_format

log = logging.getLogger("anogan_lightning")


def _instantiate_all(group: DictConfig | None) -> list:
    """Callbacks / loggers: a dict of configs, each with a ``_target_`` (or null to disable)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def _multirun_wandb(cfg: DictConfig) -> None:
    """Jobs of one multirun share a W&B group (the sweep folder) and carry their overrides."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    with open_dict(cfg):
        if hc.mode == RunMode.MULTIRUN and wandb_cfg.get("group") is None:
            wandb_cfg.group = Path(hc.sweep.dir).name
        if wandb_cfg.get("name") is None:
            wandb_cfg.name = hc.job.override_dirname or Path(cfg.paths.output_dir).name


def _wandb_runs(trainer: pl.Trainer) -> list:
    """The W&B runs of the trainer's WandbLoggers (rank 0; others get Lightning's dummy)."""
    return [lg.experiment for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def _log_config(trainer: pl.Trainer, cfg: DictConfig, results: dict) -> None:
    """W&B: the resolved config, the command-line overrides and the provenance, logged before
    training starts (a run that fails or is stopped still says what it was)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for run in _wandb_runs(trainer):
        run.config.update(
            {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "overrides": list(overrides),
                "provenance": provenance.of(results),
            },
            allow_val_change=True,
        )


ROC_POINTS = 1000  # the W&B ROC plot: at most about this many points (the AUROC: every point)


def _log_to_loggers(
    trainer: pl.Trainer, cfg: DictConfig, results: dict, record: dict, figs: dict, table: str
) -> None:
    """Extra artefacts for loggers that show them: W&B (ROC curve, results table, image
    panels, score histograms, optionally the model) and TensorBoard (figures, table)."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            run = lg.experiment
            # the provenance again: the test splits' files are known now (logged before the fit)
            run.config.update({"provenance": provenance.of(results)}, allow_val_change=True)
            numbers = {  # numbers only: provenance is in the config
                k: v
                for k, v in results.items()
                if isinstance(v, int | float)
                and not isinstance(v, bool)
                and not k.startswith(provenance.PREFIX)
            }
            payload = {
                "results": wandb.Table(
                    columns=["metric", "value"],
                    data=[[k, v] for k, v in numbers.items()],
                ),
            }
            if metrics.has_both_classes(record["labels"]):
                fpr, tpr = metrics.roc_points(record["score"], record["labels"], ROC_POINTS)
                roc = wandb.Table(
                    columns=["fpr", "tpr"], data=[[f, t] for f, t in zip(fpr, tpr, strict=True)]
                )
                auc = results.get("test/auroc", float("nan"))
                title = f"test ROC (AUC {auc:.3f})"
                payload["test/roc"] = wandb.plot.line(roc, "fpr", "tpr", title=title)
            scores = {"score": record["score"], **record["components"], **record["references"]}
            for name, s in scores.items():
                for label, cls in (("normal", 0), ("anomalous", 1)):
                    values = s[record["labels"] == cls].numpy()
                    if len(values):
                        payload[f"test/hist_{name}_{label}"] = wandb.Histogram(values)
            payload.update({f"test/{k}": wandb.Image(f) for k, f in figs.items()})
            maps = sorted((Path(cfg.paths.output_dir) / "anomaly_maps").glob("*.png"))
            if maps:
                payload["test/anomaly_maps"] = [wandb.Image(str(p), caption=p.stem) for p in maps]
            run.log(payload)
            run.summary.update(numbers)
            ckpt = results.get("checkpoint")
            if cfg.get("wandb_model") and ckpt and Path(ckpt).is_file():
                artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=numbers)
                artifact.add_file(ckpt, name="model.ckpt")
                run.log_artifact(artifact, aliases=["latest"])
        elif type(lg).__name__ == "TensorBoardLogger":
            for k, f in figs.items():
                lg.experiment.add_figure(f"test/{k}", f)
            lg.experiment.add_text("results", table)


class TrainingIncomplete(RuntimeError):
    """The fit ended before the method was usable (``training_complete()`` is False)."""


def _load_weights(model: pl.LightningModule, ckpt_path: str) -> None:
    """Trained weights (and threshold) from a checkpoint into a model built from the config,
    so scoring settings given on the command line (e.g. method.mapping_steps) apply."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"fit=false needs ckpt_path=<model.ckpt>; {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    try:
        check_format(ckpt.get("anogan_lightning") or {})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold this method's weights: {err}") from None


def extra_test_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The data configs of ``cfg.extra_test``: each entry's keys merged over ``cfg.data`` (so
    the training preprocessing carries over); null entries are switched off."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        name: OmegaConf.merge(data, keys)
        for name, keys in (cfg.get("extra_test") or {}).items()
        if keys
    }


def check_test_sets(datamodule, extra: dict) -> None:
    """Validate the run's data and every extra test set before training (their ``check()``,
    where a data module has one: roots, files, columns), so a wrong path stops the run at once
    and names it, not after the fit. The random streams are left as they were, so the seeded
    run that follows does not depend on what a check draws."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        modules = {"data": datamodule} | {f"extra_test.{k}": v for k, v in extra.items()}
        for name, dm in modules.items():
            check = getattr(dm, "check", None)
            if callable(check):
                try:
                    check()
                except (FileNotFoundError, ValueError) as err:
                    raise type(err)(f"{name}: {err}") from err
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _extra_tests(
    extra: dict, model, trainer: pl.Trainer, prep=None
) -> dict[str, tuple[dict, dict]]:
    """Score the trained model on every extra test set (name -> data module, from
    :func:`extra_test_configs`): name -> (metrics under ``test_<name>/``, the test record). The
    validation threshold applies. A set of whole volumes
    (:class:`~anogan_lightning.data.bscan_volumes.BScanVolumeTestSet`, ``volume_level``) is
    scored volume by volume through ``prep``, the run's B-scan preprocessing."""
    out = {}
    for name, dm in extra.items():
        log.info("extra test set %s: %s", name, getattr(dm, "root", ""))
        dm.setup("test")
        if getattr(dm, "volume_level", False):
            scored, record = dm.score(model, prep)
        else:
            trainer.test(model, dataloaders=dm.test_dataloader(), verbose=False)
            scored, record = model.results["test"], model.records["test"]
        metrics = {f"test_{name}/{k.split('/', 1)[1]}": v for k, v in scored.items()}
        for cls, n in dm.split_summary().get("test", {}).items():
            metrics[f"data/test_{name}_{cls}"] = n
        out[name] = (metrics, record)
    return out


def run(cfg: DictConfig) -> dict:
    """Fit, validate, test and write artefacts; returns the flat results dict."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _multirun_wandb(cfg)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    runtime.configure(cfg.get("threads"), cfg.trainer.get("deterministic"))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    extra = {name: hydra.utils.instantiate(c) for name, c in extra_test_configs(cfg).items()}
    check_test_sets(datamodule, extra)
    try:
        model = hydra.utils.instantiate(
            cfg.method, _convert_="all"
        )  # plain lists: safe to unpickle
    except Exception as err:  # e.g. a network that cannot be built at this input size
        raise ValueError(
            f"cannot build method {cfg.method._target_} (data.image_size="
            f"{cfg.data.get('image_size')}): {err.__cause__ or err}"
        ) from err
    model.data_config = OmegaConf.to_container(cfg.data, resolve=True)  # for predict
    if getattr(datamodule, "preprocessing", None) is not None:
        model.preprocessing = datamodule.preprocessing.to_dict()
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    if getattr(model, "needs_grad_at_test", False) and cfg.trainer.get("inference_mode", True):
        raise ValueError(
            f"{type(model).__name__} back-propagates at test time: it needs "
            "trainer.inference_mode=false (set by its conf/method yaml; remove the override)"
        )
    fit = cfg.get("fit", True)
    if not fit:
        _load_weights(model, cfg.ckpt_path)
    datamodule.setup("fit")
    results: dict = {"method": type(model).__name__, "output_dir": str(out_dir)}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    results.update(provenance.flatten(provenance.code()))
    results.update(provenance.flatten(provenance.software_and_machine(trainer)))
    results.update(provenance.flatten(provenance.command(overrides)))
    results.update(provenance.flatten(provenance.data(datamodule, model.data_config)))
    model.provenance = provenance.of(results)  # into the checkpoint, for predict
    for split, counts in datamodule.split_summary().items():
        for cls, n in counts.items():
            results[f"data/{split}_{cls}"] = n
    ckpt_dir = out_dir / "checkpoints"
    title = f"{type(model).__name__} on {type(datamodule).__name__}"
    _log_config(trainer, cfg, results)

    # fit on normal images (resuming from ckpt_path if given); the val split (both classes) is
    # scored once, after training
    t0 = time.perf_counter()
    if fit:
        try:
            trainer.fit(
                model, train_dataloaders=datamodule.train_dataloader(), ckpt_path=cfg.ckpt_path
            )
        except DivergenceError as err:
            last = ckpt_dir / "last.ckpt"
            where = (
                f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
            )
            raise SystemExit(f"error: {err}; {where}") from None
        if trainer.interrupted:
            raise SystemExit(f"training interrupted; checkpoints are in {ckpt_dir}")
        results["train/epochs"] = trainer.current_epoch  # completed epochs
        results["train/steps"] = trainer.global_step  # optimizer steps (every optimizer)
        results["train/batches"] = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        results["time/fit_s"] = time.perf_counter() - t0
        if not model.training_complete():  # no score from an unusable model (e.g. a cut budget)
            results |= {"status": "incomplete", "reason": model.incomplete_reason()}
            if trainer.is_global_zero:
                artefacts.write_results(out_dir / "results.json", results)
            raise TrainingIncomplete(
                f"{results['reason']}; no AUROC reported (results.json: status incomplete); "
                f"checkpoints are in {ckpt_dir}"
            )

    results["time/fit_s"] = time.perf_counter() - t0  # 0 with fit=false
    t0 = time.perf_counter()
    datamodule.setup("validate")
    trainer.validate(model, dataloaders=datamodule.val_dataloader(), verbose=False)
    results.update(model.results.get("val", {}))
    results["time/validate_s"] = time.perf_counter() - t0
    # the deployable model: trained weights + the validation threshold (for predict); every
    # rank calls save_checkpoint (it synchronises), rank 0 writes
    trainer.save_checkpoint(ckpt_dir / "model.ckpt")
    results["checkpoint"] = str(ckpt_dir / "model.ckpt")
    if trainer.is_global_zero:
        artefacts.write_results(out_dir / "results.json", results)

    t0 = time.perf_counter()
    datamodule.setup("test")
    trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    results.update(model.results.get("test", {}))
    record = model.records["test"]
    results["time/test_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # cross-device sets, each under its prefix
    extra_scored = _extra_tests(extra, model, trainer, getattr(datamodule, "preprocessing", None))
    for split_metrics, _ in extra_scored.values():
        results.update(split_metrics)
    if extra_scored:
        results["time/extra_test_s"] = time.perf_counter() - t0
    results["time/total_s"] = time.perf_counter() - t_start
    results.update(provenance.flatten(provenance.data(datamodule, model.data_config)))
    failed = artefacts.not_scored(results)
    if not trainer.is_global_zero:
        if failed:
            raise SystemExit(f"error: not scored: {'; '.join(failed)}")
        return results
    artefacts.write_results(out_dir / "results.json", results)
    artefacts.write_scores(out_dir / "scores.csv", record)
    draw = cfg.get("figures", True)
    for name, (_, rec) in extra_scored.items():
        artefacts.write_scores(out_dir / f"scores_{name}.csv", rec)
        if draw and rec.get("pixel") is not None:
            px = rec["pixel"]
            figures.write_overlays(
                out_dir / f"bscans_{name}", px["maps"], px["masks"], px["image"], px["ids"], n=8
            )
    figs = figures.write_figures(out_dir, record, title) if draw else {}
    table = artefacts.format_table(results, title)
    _log_to_loggers(trainer, cfg, results, record, figs, table)
    for fig in figs.values():
        figures.close(fig)
    print(f"\n{table}\n\nartefacts: {out_dir}")
    if failed:  # after every file: results.json says which split and why
        raise SystemExit(f"error: not scored: {'; '.join(failed)} (results.json: {out_dir})")
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("method") is None:
        sys.exit(
            "error: no method selected; add +method=<name> with one of: "
            + ", ".join(available_methods())
        )
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_finished", True) and (done := artefacts.read_finished(out_dir)) is not None:
        log.info("already finished, skipped (skip_finished=false reruns it): %s", out_dir)
        if done.get("status") == "incomplete":
            raise TrainingIncomplete(f"{done.get('reason')} (an earlier run of {out_dir})")
        return done.get("val/auroc")
    try:
        results = run(cfg)
    except BaseException as err:  # noqa: BLE001  (recorded for the report, then re-raised)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.txt").write_text(
            "".join(traceback.format_exception(err)) + f"\n{type(err).__name__}: {err}\n"
        )
        if isinstance(err, extras.MissingExtraError):  # one line naming the extra to install
            raise SystemExit(f"error: {err}") from None
        raise
    (out_dir / "error.txt").unlink(missing_ok=True)
    return results.get("val/auroc")  # the value an Optuna sweeper optimises


if __name__ == "__main__":
    if (missing := extras.missing_for_overrides(sys.argv[1:])) is not None:
        sys.exit(f"error: {missing}")  # e.g. +sweep=optuna without the sweeps extra
    main()
