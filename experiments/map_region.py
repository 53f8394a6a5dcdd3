"""Where a checkpoint's own anomaly map may fire: ``data.map_region`` band vs retina on
duke-dme-fluid, for any method (the map its ``score`` returns: dark_z, AnoGAN's residual, the
AAM, ...).

    python experiments/map_region.py <run>/checkpoints/model.ckpt [...] [--shared ../shared/data]

Every checkpoint must be a ``data.resize=retina`` run. Its data settings (retina normalisation,
windows) come from the checkpoint. Duke is split by subject: 1-2 (the validation for choosing
the region) and 3-5 (reported apart). Prints one line per checkpoint and region: pixel AUROC of
fluid and the image-level AUROC (fluid vs none) of the ``map_retina`` rule, each as
subjects 1-2 / 3-5 / all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from anomaly_maps import DUKE, _data  # experiments/, the script's folder
from torch.utils.data import DataLoader

from anogan_lightning.data.bscan_folder import BScanFolderDataModule
from anogan_lightning.evaluation import metrics, pixel, stitch
from anogan_lightning.predict import load_model


def stitched_maps(model, ds, batch_size: int = 128) -> np.ndarray:
    """The method's own map of every window of ``ds``, stitched per B-scan (band coordinates)."""
    stitcher = stitch.Stitcher(ds.image_shapes)
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        with torch.inference_mode(not model.needs_grad_at_test):
            out = model.score({"x": batch["x"], "id": batch["id"]})
        if "amap" not in out:
            raise ValueError(f"{type(model).__name__} gives no anomaly map")
        stitcher.add(out["amap"].detach().float().cpu(), batch["coords"])
    return stitcher.maps()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="+")
    ap.add_argument("--shared", default="../shared/data")
    args = ap.parse_args()
    root = Path(args.shared) / "duke-dme-fluid"
    for ckpt in args.ckpt:
        model, cfg = load_model(ckpt, torch.device("cpu"))
        if cfg.get("resize") != "retina":
            raise SystemExit(f"{ckpt}: a data.resize=retina checkpoint is needed")
        dm = BScanFolderDataModule(**_data(cfg, root=str(root), **DUKE, map_region="band"))
        dm.setup("test")
        ds = dm.test_set
        n = len(ds.image_ids)
        raw = stitched_maps(model, ds)
        masks = stitch.pad_stack([ds.image_mask(i) for i in range(n)], raw.shape)
        labels = torch.as_tensor(ds.image_labels)
        subj = np.array([int(Path(p).stem[7:9]) for p in ds.image_ids])
        parts = (subj <= 2, subj >= 3, subj > 0)
        retina = [ds.image_retina(i) for i in range(n)]
        for region in ("band", "retina"):
            ds.map_region = region
            maps = ds.restrict_maps(raw)
            image = stitch.retina_map_scores(maps, retina)
            px = "/".join(f"{pixel.pixel_auroc(maps[s], masks[s]):.3f}" for s in parts)
            im = "/".join(f"{metrics.auroc(image[s], labels[s]):.3f}" for s in parts)
            print(f"{ckpt} {region}: pixel {px} image(map_retina) {im}", flush=True)


if __name__ == "__main__":
    main()
