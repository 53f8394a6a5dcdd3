"""Sparse-GAN family: scoring throughput vs AnoGAN's mapping, the SRN's training cost, peak memory.

Paper sizes: 224x224, width 64 (latent 1024x7x7), batch 32, CPU by default.
- ``score_images_per_s_<method>``: ``score()`` of autoencoder, pix2pix_image, pix2pix_latent and
  sparse_gan (eval mode, inference_mode), warm-up batch excluded.
- ``anogan_mapping_images_per_s``: AnoGAN at its paper size (DCGAN 512-256-128-64, 64x64, z 100)
  mapping a batch of 32 for ``--anogan-steps`` steps, scaled linearly to Γ = 500 steps (every
  mapping step costs the same: one G + D forward and backward). ``speedup_vs_anogan_<method>``
  is the per-image ratio (target >= 100) with our methods at 224x224 (12x AnoGAN's pixels);
  ``speedup_vs_anogan_64px_<method>`` the same networks scoring 64x64 images (equal input size).
- ``train_step_s_<method>``: one full training step (D and G updates) of pix2pix_latent and
  sparse_gan through a Lightning Trainer on one fixed batch, first step excluded;
  ``srn_train_overhead_pct`` is the SRN's share.
- ``peak_rss_mb_<task>``: peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
  of a fresh subprocess per task, so one task's allocations never count for another;
  ``model_rss_mb_<task>`` is the resident memory after building the model, before the work.
  tracemalloc does not see torch's allocations, so it is not used.

Each task runs in its own process (``--task``); the parent prints ``key=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SCORERS = ("autoencoder", "pix2pix_image", "pix2pix_latent", "sparse_gan")
TRAINERS = ("pix2pix_latent", "sparse_gan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(method: str, size: int, width: int):
    from anogan_lightning.methods.autoencoder import AutoEncoder
    from anogan_lightning.methods.pix2pix import Pix2Pix
    from anogan_lightning.methods.sparse_gan import SparseGAN

    if method == "autoencoder":
        return AutoEncoder(width=width, image_size=size)
    if method == "sparse_gan":
        return SparseGAN(width=width, image_size=size)
    return Pix2Pix(width=width, image_size=size, score_space=method.removeprefix("pix2pix_"))


def batch_of(n: int, size: int) -> dict:
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"x": x, "label": torch.zeros(n, dtype=torch.long), "id": [str(i) for i in range(n)]}


def task_score(method: str, args) -> dict:
    model = build(method, args.size, args.width).eval()
    batch = batch_of(args.batch, args.size)
    model_rss = rss_mb()
    with torch.inference_mode():
        model.score(batch)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.reps):
            model.score(batch)
        dt = time.perf_counter() - t0
    return {"images_per_s": args.batch * args.reps / dt, "model_rss_mb": model_rss}


def task_train(method: str, args) -> dict:
    import pytorch_lightning as pl

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a) -> None:
            self.times.append(time.perf_counter() - self.t0)

    model = build(method, args.size, args.width)
    model_rss = rss_mb()
    timer = Timer()
    steps = args.train_steps + 1
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader([batch_of(args.batch, args.size)] * steps, batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    times = timer.times[1:]  # first step: allocator and oneDNN warm-up
    return {"step_s": sum(times) / len(times), "model_rss_mb": model_rss}


def task_anogan(args) -> dict:
    from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z
    from anogan_lightning.scoring import map_latent

    g, d = DCGANGenerator(100, 1, 64, 64), DCGANDiscriminator(1, 64, 64)
    x = torch.rand(args.batch, 1, 64, 64) * 2 - 1
    z = sample_uniform_z(args.batch, 100)
    model_rss = rss_mb()
    map_latent(g, d, x, z, steps=1)  # warm-up
    t0 = time.perf_counter()
    map_latent(g, d, x, z, steps=args.anogan_steps)
    dt = time.perf_counter() - t0
    per_image_500 = dt / args.batch / args.anogan_steps * 500  # linear in the number of steps
    return {"images_per_s": 1 / per_image_500, "model_rss_mb": model_rss}


def child(args) -> None:
    torch.manual_seed(0)
    kind, _, method = args.task.partition(":")
    if kind == "score":
        out = task_score(method, args)
    elif kind == "train":
        out = task_train(method, args)
    else:
        out = task_anogan(args)
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def run_task(task: str, argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--task", task, *argv], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"task {task} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--anogan-steps", type=int, default=5)
    args, _ = ap.parse_known_args()
    if args.task:
        child(args)
        return
    argv = [
        f"--batch={args.batch}",
        f"--size={args.size}",
        f"--width={args.width}",
        f"--reps={args.reps}",
        f"--train-steps={args.train_steps}",
        f"--anogan-steps={args.anogan_steps}",
    ]
    print(
        f"device=cpu threads={torch.get_num_threads()} batch={args.batch} size={args.size} "
        f"width={args.width}"
    )
    anogan = run_task("anogan", argv)
    print(
        f"anogan_mapping_images_per_s={anogan['images_per_s']:.4f} (Γ=500, timed {args.anogan_steps} steps x batch {args.batch}, 64x64, scaled linearly)"
    )
    print(f"peak_rss_mb_anogan_mapping={anogan['peak_rss_mb']:.0f}")
    for m in SCORERS:
        r = run_task(f"score:{m}", argv)
        print(f"score_images_per_s_{m}={r['images_per_s']:.2f}")
        print(f"speedup_vs_anogan_{m}={r['images_per_s'] / anogan['images_per_s']:.0f}")
        print(f"model_rss_mb_score_{m}={r['model_rss_mb']:.0f}")
        print(f"peak_rss_mb_score_{m}={r['peak_rss_mb']:.0f}")
    # the same networks (width 64) at AnoGAN's 64x64: per-image speed-up at equal input size
    argv64 = [a if not a.startswith("--size=") else "--size=64" for a in argv]
    for m in SCORERS:
        r = run_task(f"score:{m}", argv64)
        print(f"score_images_per_s_64px_{m}={r['images_per_s']:.1f}")
        print(f"speedup_vs_anogan_64px_{m}={r['images_per_s'] / anogan['images_per_s']:.0f}")
    steps = {}
    for m in TRAINERS:
        r = run_task(f"train:{m}", argv)
        steps[m] = r["step_s"]
        print(f"train_step_s_{m}={r['step_s']:.2f}")
        print(f"model_rss_mb_train_{m}={r['model_rss_mb']:.0f}")
        print(f"peak_rss_mb_train_{m}={r['peak_rss_mb']:.0f}")
    overhead = 100 * (steps["sparse_gan"] / steps["pix2pix_latent"] - 1)
    print(f"srn_train_overhead_pct={overhead:.1f}")


if __name__ == "__main__":
    main()
