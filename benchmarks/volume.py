"""OCT volume pipeline: preprocessing throughput per core and cached patch loading throughput.

1. Preprocessing, pinned to one CPU core with one BLAS/OpenMP thread: paper-size phantom volumes
   (49 B-scans x 496 rows x 512 columns at 11.5 µm, :mod:`anogan_lightning.data.synthetic_volume`)
   through read + intensity normalisation + x-resampling to 22 µm, boundary segmentation,
   flattening + cropping (192 rows), and patching (75 random 64x64 patches per B-scan, as the
   paper's 1M patches / 270 volumes / 49 B-scans). Prints B-scans per CPU-second per step and
   for ``segmentation + flattening + patching`` together (the per-core figure; CPU time, so a
   busy shared machine does not deflate it), the whole preparation, and the wall-clock rate.
2. Loading: the training split of those volumes from the memory-mapped cache through
   ``OCTVolumeDataModule.train_dataloader()`` with the config's default workers and batch size,
   a few epochs, patches/s (target >= 20,000 64x64 patches/s), the same with 2 workers, and, for
   comparison, the dataset through a plain per-item DataLoader (``__getitem__`` per patch +
   default_collate).

``python benchmarks/volume.py [--volumes 4] [--epochs 3]``; prints ``key=value`` lines.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS: one thread = one core's throughput

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from anogan_lightning.data.oct_volume import OCTVolumeDataModule  # noqa: E402
from anogan_lightning.data.readers import read_volume  # noqa: E402
from anogan_lightning.data.retina.normalize import flatten_crop, normalize_intensity, resample_x  # noqa: E402
from anogan_lightning.data.retina.patches import extract_patches, random_patch_positions  # noqa: E402
from anogan_lightning.data.retina.segment import BoundaryParams, detect_boundaries  # noqa: E402
from anogan_lightning.data.synthetic_volume import make_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER_SHAPE = (49, 496, 512)
SPACING_UM = np.array([120.0, 3.87, 11.5])
CROP, BELOW, SIZE, PER_BSCAN = 192, 16, 64, 75


def write_volumes(root: Path, n_train: int, n_test: int) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test" / "masks").mkdir(parents=True)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            v = make_volume(0, split, i, split == "test" and i % 2 == 1, PAPER_SHAPE)
            np.savez(root / split / f"vol_{i:03d}.npz", volume=v.volume, spacing=SPACING_UM)
            if split == "test":
                np.save(root / "test" / "masks" / f"vol_{i:03d}.npy", v.mask)


def time_preprocessing(paths: list[Path]) -> tuple[dict[str, float], dict[str, float], int]:
    """Wall and CPU seconds per step, summed over volumes, and the B-scan count.

    CPU time (``time.process_time``) is what one core spends: on a shared machine it is the
    fair per-core figure, wall time the one a user waits for."""
    steps = ("read", "normalize_resample", "segment", "flatten", "patch")
    wall, cpu = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0)
    n_bscans = 0
    rng = np.random.default_rng(0)
    for path in paths:
        marks = [(time.perf_counter(), time.process_time())]
        vol = read_volume(path)
        marks.append((time.perf_counter(), time.process_time()))
        x = normalize_intensity(vol.data)
        x = resample_x(x, vol.spacing[2], 22.0)
        marks.append((time.perf_counter(), time.process_time()))
        params = BoundaryParams().scaled(rows=x.shape[1] / 496, cols=11.5 / 22.0)
        ilm, bm = detect_boundaries(x, params)
        marks.append((time.perf_counter(), time.process_time()))
        band, ilm_b, bm_b, _ = flatten_crop(x, ilm, bm, CROP, BELOW)
        band = np.round((band + 1) * 127.5).astype(np.uint8)
        marks.append((time.perf_counter(), time.process_time()))
        for b in range(len(band)):
            pos = random_patch_positions(ilm_b[b], bm_b[b], CROP, SIZE, PER_BSCAN, rng)
            extract_patches(band[b], pos, SIZE).copy()
        marks.append((time.perf_counter(), time.process_time()))
        for i, key in enumerate(steps):
            wall[key] += marks[i + 1][0] - marks[i][0]
            cpu[key] += marks[i + 1][1] - marks[i][1]
        n_bscans += len(band)
    return wall, cpu, n_bscans


def loader_throughput(loader: DataLoader, epochs: int) -> tuple[float, float]:
    """(patches per wall second, per CPU second of this process) over ``epochs`` full passes,
    after one warm-up pass (page cache, worker start)."""
    for _ in loader:
        pass
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["x"])
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=4, help="paper-size training volumes")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = OmegaConf.load(REPO / "anogan_lightning/conf/data/oct_volume.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_volumes(root, args.volumes, 2)
        paths = sorted((root / "train").glob("*.npz"))

        # 1. preprocessing on one core
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        wall, cpu, n = time_preprocessing(paths)
        print(f"volume_shape={'x'.join(map(str, PAPER_SHAPE))}")
        print(f"volumes={len(paths)}")
        print(f"load_average_1min={os.getloadavg()[0]:.1f}")
        for key in wall:
            print(f"{key}_bscans_per_cpu_s={n / cpu[key]:.1f}")
        core = ("segment", "flatten", "patch")
        print(f"segment_flatten_patch_bscans_per_s_per_core={n / sum(cpu[k] for k in core):.1f}")
        print(f"full_preparation_bscans_per_s_per_core={n / sum(cpu.values()):.1f}")
        print(f"segment_flatten_patch_bscans_per_wall_s={n / sum(wall[k] for k in core):.1f}")
        os.sched_setaffinity(0, set(cpus))

        # 2. cached loading with the config defaults (workers, batch size)
        dm = OCTVolumeDataModule(
            root=str(root),
            cache_dir=str(Path(tmp) / "cache"),
            image_size=SIZE,
            train_patches_per_bscan=PER_BSCAN,
            val_volumes=1,
            crop_height=CROP,
            below_bm=BELOW,
            batch_size=int(cfg.batch_size),
            num_workers=int(cfg.num_workers),
        )
        t0 = time.perf_counter()
        dm.setup("fit")
        print(f"setup_first_run_s={time.perf_counter() - t0:.1f}")
        t0 = time.perf_counter()
        again = OCTVolumeDataModule(**{**dm.hparams})
        again.setup("fit")
        print(f"setup_cached_run_s={time.perf_counter() - t0:.2f}")
        print(f"cache_hits={again.cache_stats['volumes_cached']}")
        print(f"train_patches={len(dm.train_set)}")
        print(f"batch_size={dm.batch_size}")
        print(f"num_workers={dm.num_workers}")
        rate, rate_cpu = loader_throughput(dm.train_dataloader(), args.epochs)
        print(f"cached_loader_patches_per_s={rate:.0f}")
        if dm.num_workers == 0:  # all loading happens in this process
            print(f"cached_loader_patches_per_cpu_s={rate_cpu:.0f}")
        print(f"cached_loader_target_met={rate >= 20_000}")
        for workers in (2,):
            dm.num_workers = workers
            rate_w, _ = loader_throughput(dm.train_dataloader(), args.epochs)
            print(f"cached_loader_patches_per_s_{workers}_workers={rate_w:.0f}")
        dm.num_workers = int(cfg.num_workers)
        per_item = DataLoader(
            dm.train_set,
            batch_size=dm.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=dm.num_workers,
        )
        rate_item, _ = loader_throughput(per_item, 1)
        print(f"per_item_loader_patches_per_s={rate_item:.0f}")
        print(f"batched_read_speedup={rate / rate_item:.1f}")


if __name__ == "__main__":
    main()
