"""Score new scans with a trained model:
``python -m anogan_lightning.predict ckpt=<model.ckpt> input=<image | folder>``.

The checkpoint (``checkpoints/model.ckpt`` of a training run) carries the method's class and
hyperparameters, its weights, the decision threshold chosen on the validation split and the
data settings it was trained with, so new B-scans are preprocessed exactly as its test images
were (grayscale, resized to the training height, centre square crop, optional flattening).

Writes into the run directory (``outputs/predict/<date>_<time>/``):
- ``predictions.csv``: one row per file: ``path``, ``status`` (``ok`` or ``unreadable``),
  ``score``, every score component, ``anomalous`` (1 when score >= threshold), ``threshold``,
  and ``error`` for unreadable files (reported, skipped, never fatal);
- ``heatmaps/<k>_<name>.png``: the scan and its anomaly map (``heatmaps=false`` skips them).
A folder is streamed in batches (``batch_size``, ``num_workers``) with a progress bar.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anogan_lightning.data.kermany import read_image
from anogan_lightning.data.transforms import crop_square, to_unit_range

log = logging.getLogger("anogan_lightning.predict")
SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")


def list_inputs(path: str | Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"no images ({' '.join(SUFFIXES)}) under {path}")
    return files


class ScanFiles(Dataset):
    """Image files as the model's test images; unreadable files become error items."""

    def __init__(
        self, paths: list[Path], image_size: int, resize: str, flatten: bool, fill_white: bool
    ) -> None:
        self.paths, self.image_size, self.resize = paths, image_size, resize
        self.flatten, self.fill_white = flatten, fill_white

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            a = read_image(path, self.image_size, self.resize, self.flatten, self.fill_white)
        except Exception as e:  # any decoder error: reported in the CSV, the rest goes on
            return {"id": str(path), "error": f"{type(e).__name__}: {e}"}
        x = torch.from_numpy(to_unit_range(crop_square(a)))[None]  # (1, S, S)
        return {"id": str(path), "x": x}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "x" in it]
    return {
        "x": torch.stack([it["x"] for it in good]) if good else None,
        "id": [it["id"] for it in good],
        "errors": [(it["id"], it["error"]) for it in items if "error" in it],
    }


def load_model(ckpt: str | Path, device: torch.device):
    """The method (class from the checkpoint), its weights and threshold, in eval mode."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    meta = torch.load(ckpt, map_location="cpu", weights_only=False).get("anogan_lightning")
    if not meta:
        raise ValueError(f"{ckpt} was not written by anogan_lightning.train (no method record)")
    cls = hydra.utils.get_class(meta["class"])
    model = cls.load_from_checkpoint(ckpt, map_location=device)
    return model.eval().to(device), meta.get("data", {})


def _heatmap(path: Path, x: torch.Tensor, amap: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(x[0].numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(x[0].numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[1].imshow(amap[0].numpy(), cmap="jet", alpha=0.45)
    axes[1].set_title("anomaly map", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict(cfg: DictConfig) -> Path:
    """Score every input file; returns the path of predictions.csv."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    model, data = load_model(cfg.ckpt, device)
    files = list_inputs(cfg.input)
    threshold = float(cfg.threshold) if cfg.threshold is not None else float(model.threshold)
    if math.isnan(threshold):
        log.warning("the checkpoint has no validation threshold: the anomalous column is empty")
    image_size = int(model.hparams.get("image_size", data.get("image_size", 64)))
    ds = ScanFiles(
        files,
        image_size,
        data.get("resize", "crop"),
        bool(data.get("flatten", False)),
        bool(data.get("fill_white", False)),
    )
    loader = DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.heatmaps:
        (out / "heatmaps").mkdir(exist_ok=True)
    names = list(getattr(model, "components", ()))
    csv_path = out / "predictions.csv"
    n_ok = n_bad = 0
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "status", "score", *names, "anomalous", "threshold", "error"])
        for batch in tqdm(loader, desc="scoring", unit="batch"):
            for path, err in batch["errors"]:
                log.warning("skipping unreadable image %s: %s", path, err)
                w.writerow([path, "unreadable", "", *[""] * len(names), "", "", err])
                n_bad += 1
            if batch["x"] is None:
                continue
            x = batch["x"].to(device)
            with torch.inference_mode(not model.needs_grad_at_test):
                res = model.score({"x": x, "id": batch["id"]})
            score = res["score"].detach().float().cpu()
            for i, path in enumerate(batch["id"]):
                s = float(score[i])
                flag = "" if math.isnan(threshold) else int(s >= threshold)
                comps = [f"{float(res[n][i]):.8g}" for n in names]
                w.writerow([path, "ok", f"{s:.8g}", *comps, flag, f"{threshold:.8g}", ""])
                if cfg.heatmaps and "amap" in res:
                    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)
                    _heatmap(
                        out / "heatmaps" / f"{n_ok:06d}_{stem}.png",
                        x[i].detach().float().cpu(),
                        res["amap"][i].detach().float().cpu(),
                        f"{path}\nscore {s:.4g}"
                        + (f" ({'anomalous' if flag else 'normal'})" if flag != "" else ""),
                    )
                n_ok += 1
            fh.flush()
    print(f"scored {n_ok} scan(s), {n_bad} unreadable; predictions: {csv_path}")
    return csv_path


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
