"""Entry point: ``python -m anogan_lightning.train +method=<name> [overrides]``.

Seeds, instantiates data / method / trainer / loggers from the Hydra config, fits on normal
images, validates (which fixes the decision threshold), tests, and writes the run's artefacts
into the Hydra run directory.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from anogan_lightning import artefacts
from anogan_lightning.methods.base import DivergenceError

log = logging.getLogger("anogan_lightning")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def available_methods() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def _instantiate_all(group: DictConfig | None) -> list:
    """Callbacks / loggers: a dict of configs, each with a ``_target_`` (or null to disable)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def _log_to_loggers(trainer: pl.Trainer, results: dict, figures: dict, table: str) -> None:
    """Extra artefacts for loggers that show them (W&B: images and the results table)."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.experiment.log({f"test/{k}": wandb.Image(f) for k, f in figures.items()})
            rows = [[k, v] for k, v in results.items() if isinstance(v, int | float)]
            lg.experiment.log({"results": wandb.Table(columns=["metric", "value"], data=rows)})
            lg.experiment.summary.update(results)
        elif type(lg).__name__ == "TensorBoardLogger":
            for k, f in figures.items():
                lg.experiment.add_figure(f"test/{k}", f)
            lg.experiment.add_text("results", table)


def run(cfg: DictConfig) -> dict:
    """Fit, validate, test and write artefacts; returns the flat results dict."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")  # plain lists: safe to unpickle
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
    datamodule.setup("fit")
    results: dict = {"method": type(model).__name__, "output_dir": str(out_dir)}
    for split, counts in datamodule.split_summary().items():
        for cls, n in counts.items():
            results[f"data/{split}_{cls}"] = n
    ckpt_dir = out_dir / "checkpoints"
    title = f"{type(model).__name__} on {type(datamodule).__name__}"

    # fit on normal images; the val split (both classes) is scored once, after training
    try:
        trainer.fit(model, train_dataloaders=datamodule.train_dataloader(), ckpt_path=cfg.ckpt_path)
    except DivergenceError as err:
        last = ckpt_dir / "last.ckpt"
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise SystemExit(f"error: {err}; {where}") from None
    if trainer.interrupted:
        raise SystemExit(f"training interrupted; checkpoints are in {ckpt_dir}")

    datamodule.setup("validate")
    trainer.validate(model, dataloaders=datamodule.val_dataloader(), verbose=False)
    results.update(model.results.get("val", {}))
    if trainer.is_global_zero:
        # the deployable model: trained weights + the validation threshold (for predict)
        trainer.save_checkpoint(ckpt_dir / "model.ckpt")
        results["checkpoint"] = str(ckpt_dir / "model.ckpt")
        artefacts.write_results(out_dir / "results.json", results)

    datamodule.setup("test")
    trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    results.update(model.results.get("test", {}))
    if not trainer.is_global_zero:
        return results
    artefacts.write_results(out_dir / "results.json", results)
    record = model.records["test"]
    artefacts.write_scores(out_dir / "scores.csv", record)
    figures = artefacts.write_figures(out_dir, record, title)
    table = artefacts.format_table(results, title)
    _log_to_loggers(trainer, results, figures, table)
    print(f"\n{table}\n\nartefacts: {out_dir}")
    return results


def _finished(out_dir: Path) -> dict | None:
    """The results of a job that already finished in ``out_dir`` (a rerun sweep), else None."""
    f = out_dir / "results.json"
    if not f.is_file():
        return None
    try:
        results = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return results if "test/auroc" in results else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("method") is None:
        sys.exit(
            "error: no method selected; add +method=<name> with one of: "
            + ", ".join(available_methods())
        )
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_finished", True) and (done := _finished(out_dir)) is not None:
        log.info("already finished, skipped (skip_finished=false reruns it): %s", out_dir)
        return done.get("val/auroc")
    try:
        results = run(cfg)
    except BaseException as err:  # noqa: BLE001  (recorded for the report, then re-raised)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.txt").write_text(
            "".join(traceback.format_exception(err)) + f"\n{type(err).__name__}: {err}\n"
        )
        raise
    (out_dir / "error.txt").unlink(missing_ok=True)
    return results.get("val/auroc")  # the value an Optuna sweeper optimises


if __name__ == "__main__":
    main()
