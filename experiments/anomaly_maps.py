"""Compare the anomaly maps of a reconstruction method's checkpoint on duke-dme-fluid (pixel AUROC
of fluid, image-level fluid vs none) and mexico-dme (NORMAL vs DME), every map from one pass.

    python experiments/anomaly_maps.py <run>/checkpoints/model.ckpt [--shared ../shared/data]

The model's data settings (retina normalisation, windows) come from the checkpoint; the
residual normaliser (maps zscore, dark_z) is fitted on kermany training windows when the
checkpoint has none (as training does at its end). Duke is split by subject: 1-2 (the
validation for choosing a map) and 3-5 (reported apart). Prints one ``key=value`` line per
(map, smoothing, set, metric).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from anogan_lightning import scoring
from anogan_lightning.data.bscan_folder import BScanFolderDataModule
from anogan_lightning.data.kermany import KermanyDataModule
from anogan_lightning.evaluation import metrics, pixel, stitch
from anogan_lightning.predict import load_model

MAPS: list[tuple[str, float]] = []  # (map, sigma): set from --maps x --sigmas
DUKE = dict(
    csv="manifest.csv",
    path_column="file",
    label_column="has_fluid",
    group_column="subject",
    image_dir="images",
    mask_dir="masks",
    pool_split=(0, 0, 1),
    val_fraction=0,
)


def _data(cfg: dict, **keys) -> dict:
    out = {k: v for k, v in cfg.items() if k != "_target_"}
    out.update(keys, num_workers=0)
    return out


@torch.no_grad()
def score_set(model, ds) -> dict:
    """Stitched maps (per map kind) and window-mean map scores of every window of ``ds``."""
    loader = DataLoader(ds, batch_size=256, shuffle=False)
    stitchers = {m: stitch.Stitcher(ds.image_shapes) for m in MAPS}
    win = {m: [] for m in MAPS}
    base, index = [], []
    for batch in loader:
        x = batch["x"]
        x_hat = model.reconstruct(x)
        base.append(scoring.mean_sq(x, x_hat))
        index.append(batch["coords"][:, 0])
        for kind, sigma in MAPS:
            amap = scoring.anomaly_map(kind, x, x_hat, model.map_norm, model.map_features, sigma)
            stitchers[(kind, sigma)].add(amap, batch["coords"])
            win[(kind, sigma)].append(amap.flatten(1).mean(1))
    index = torch.cat(index)
    return {
        "maps": {m: s.maps() for m, s in stitchers.items()},
        "window": {m: torch.cat(v) for m, v in win.items()},
        "base": torch.cat(base),
        "index": index,
    }


def image_scores(res: dict, n: int, m) -> dict[str, torch.Tensor]:
    """B-scan scores of map ``m``: window-mean map aggregated (max / top3 / mean), and the
    stitched map's 99th percentile."""
    agg = stitch.aggregate_windows
    _, rules = agg(res["window"][m], res["index"], n, "max", 3, all_rules=True)
    q = [np.nanpercentile(a, 99) for a in res["maps"][m]]
    return {**rules, "p99": torch.tensor(q, dtype=torch.float64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--maps", default=",".join(scoring.ANOMALY_MAPS))
    ap.add_argument("--sigmas", default="0,2,4")
    args = ap.parse_args()
    sigmas = [float(v) for v in args.sigmas.split(",")]
    MAPS.extend((k, s) for k in args.maps.split(",") for s in sigmas)
    shared = Path(args.shared)
    model, cfg = load_model(args.ckpt, torch.device("cpu"))
    if not torch.isfinite(model.map_norm).all():
        dm = KermanyDataModule(**_data(cfg))
        dm.setup("fit")
        model.fit_map_norm(dm.train_dataloader())
    print("map_norm_std=" + ",".join(f"{v:.3f}" for v in model.map_norm[1].tolist()))

    duke = BScanFolderDataModule(**_data(cfg, root=str(shared / "duke-dme-fluid"), **DUKE))
    duke.setup("test")
    ds = duke.test_set
    res = score_set(model, ds)
    n = len(ds.image_ids)
    labels = torch.as_tensor(ds.image_labels)
    subj = np.array([int(Path(p).stem[7:9]) for p in ds.image_ids])
    parts = {"val12": subj <= 2, "test345": subj >= 3, "all": subj > 0}
    masks = stitch.pad_stack([ds.image_mask(i) for i in range(n)], res["maps"][MAPS[0]].shape)
    base = stitch.aggregate_windows(res["base"], res["index"], n, "max", 3, all_rules=True)[1]
    for part, sel in parts.items():
        for rule, s in base.items():
            print(f"duke_{part}_image_mse_{rule}={metrics.auroc(s[sel], labels[sel]):.4f}")
    for m in MAPS:
        name = f"{m[0]}_s{m[1]:g}"
        scores = image_scores(res, n, m)
        for part, sel in parts.items():
            px = pixel.pixel_auroc(res["maps"][m][sel], masks[sel])
            print(f"duke_{part}_pixel_{name}={px:.4f}")
            for rule, s in scores.items():
                a = metrics.auroc(s[sel], labels[sel])
                print(f"duke_{part}_image_{name}_{rule}={a:.4f}")

    mex = BScanFolderDataModule(**_data(cfg, root=str(shared / "mexico-dme"), val_fraction=0))
    mex.setup("test")
    ds = mex.test_set
    res = score_set(model, ds)
    n = len(ds.image_ids)
    labels = torch.as_tensor(ds.image_labels)
    base = stitch.aggregate_windows(res["base"], res["index"], n, "max", 3, all_rules=True)[1]
    for rule, s in base.items():
        print(f"mexico_image_mse_{rule}={metrics.auroc(s, labels):.4f}")
    for m in MAPS:
        for rule, s in image_scores(res, n, m).items():
            a = metrics.auroc(s, labels)
            print(f"mexico_image_{m[0]}_s{m[1]:g}_{rule}={a if not math.isnan(a) else 'nan'}")


if __name__ == "__main__":
    main()
