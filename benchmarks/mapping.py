"""AnoGAN latent mapping: batched vs one image at a time, and achieved FLOP/s.

Paper-size networks (DCGAN 512-256-128-64, 5x5 kernels, z 100, 64x64), batch 64. Prints
image-steps/s for the batched mapping and for mapping the same images one by one, the ratio as
``batched_mapping_speedup=<ratio>``, the FLOPs of one mapping step counted by
``torch.utils.flop_counter`` and the achieved FLOP/s next to a plain float32 matmul's FLOP/s
measured in the same run. ``--device cuda`` (when there is one) also times mapping
8192 patches x 500 steps in batches of ``--gpu-batch``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z
from anogan_lightning.scoring import frozen, map_latent


def matmul_flops(device: str, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(g, d, x, z) -> int:
    """FLOPs of one mapping step (G and D forward on G(z), backward to z)."""
    with FlopCounterMode(display=False) as counter:
        map_latent(g, d, x, z, steps=1, lam=0.1)
    # steps=1 runs 2 forward passes (before and after the update) and 1 backward, plus the
    # f(x) pass on the query; one mapping step in a long run is 1 forward + 1 backward
    with FlopCounterMode(display=False) as fwd_only:
        map_latent(g, d, x, z, steps=0, lam=0.1)
    fwd = fwd_only.get_total_flops()  # f(x) + one forward on G(z)
    return counter.get_total_flops() - fwd


def timed_mapping(g, d, x, z, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    map_latent(g, d, x, z, steps=steps, lam=0.1)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--single-images", type=int, default=8)
    ap.add_argument("--gpu-batch", type=int, default=2048)
    args, _ = ap.parse_known_args()
    dev = args.device
    torch.manual_seed(0)
    g = DCGANGenerator(100, 1, 64, 64).to(dev)
    d = DCGANDiscriminator(1, 64, 64).to(dev)
    with frozen(g), torch.no_grad():
        x = g(sample_uniform_z(args.batch, 100, device=dev)).clamp(-1, 1)
    z = sample_uniform_z(args.batch, 100, device=dev)

    timed_mapping(g, d, x, z, 2, dev)  # warm-up
    t_batched = timed_mapping(g, d, x, z, args.steps, dev)
    batched_rate = args.batch * args.steps / t_batched
    n1 = args.single_images
    t_single = sum(
        timed_mapping(g, d, x[i : i + 1], z[i : i + 1], args.steps, dev) for i in range(n1)
    )
    single_rate = n1 * args.steps / t_single
    flops = step_flops(g, d, x, z)
    achieved = flops * args.steps / t_batched
    peak = matmul_flops(dev)
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch} steps={args.steps}")
    print(f"batched_image_steps_per_s={batched_rate:.1f}")
    print(f"single_image_steps_per_s={single_rate:.1f}")
    print(f"batched_mapping_speedup={batched_rate / single_rate:.2f}")
    print(f"mapping_step_gflop={flops / 1e9:.2f}")
    print(f"mapping_gflops_per_s={achieved / 1e9:.1f}")
    print(f"matmul_fp32_gflops_per_s={peak / 1e9:.1f}")
    print(f"mapping_fraction_of_matmul={achieved / peak:.2f}")
    if dev.startswith("cuda"):
        n, steps, bs = 8192, 500, args.gpu_batch
        xs = g(sample_uniform_z(n, 100, device=dev)).detach().clamp(-1, 1)
        zs = sample_uniform_z(n, 100, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            map_latent(g, d, xs[i : i + bs], zs[i : i + bs], steps=steps, lam=0.1)
        sync(dev)
        print(f"gpu_map_8192x500_s={time.perf_counter() - t0:.1f} (batch {bs})")


if __name__ == "__main__":
    main()
