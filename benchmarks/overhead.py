"""Lightning overhead: AnoGAN's training step in a Trainer vs a bare PyTorch loop.

Both do the same DCGAN update (one D step, one non-saturating G step, Adam) on the same
in-memory batches with the same networks; the bare loop has no logging, callbacks or hooks.
Runs are interleaved (bare, Lightning, bare, Lightning) and the faster of each pair kept, so
a busy machine colours both alike. Prints ``lightning_overhead_pct=<%>`` (target <= 10).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import lightning_loop

from anogan_lightning.methods.anogan import AnoGAN
from anogan_lightning.nets.dcgan import sample_uniform_z


def batches(n: int, batch: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.rand(batch, 1, size, size, generator=g) * 2 - 1} for _ in range(n)]


def bare_loop(model: AnoGAN, data: list[dict]) -> float:
    g, d = model.generator, model.discriminator
    hp = model.hparams
    opt_d = torch.optim.Adam(d.parameters(), lr=hp.lr, betas=tuple(hp.betas))
    opt_g = torch.optim.Adam(g.parameters(), lr=hp.lr, betas=tuple(hp.betas))
    g.train()
    d.train()
    t0 = time.perf_counter()
    for batch in data:
        x = batch["x"]
        z = sample_uniform_z(len(x), hp.latent_dim)
        x_fake = g(z)
        logit_real, logit_fake = d(x), d(x_fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logit_real, torch.ones_like(logit_real)
        ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        logit_gen = d(x_fake)
        loss_g = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args, _ = ap.parse_known_args()
    # one thread: the framework's per-step work is what differs, and idle OpenMP threads
    # spinning between ops would add noise of their own to both loops
    torch.set_num_threads(args.threads)
    data = batches(args.steps, args.batch, args.image_size)
    kw = dict(width=args.width, image_size=args.image_size, progress=False)
    bare_loop(AnoGAN(**kw), data[:3])  # warm-up
    bare, light = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        bare.append(bare_loop(AnoGAN(**kw), data))
        torch.manual_seed(0)
        light.append(lightning_loop(AnoGAN(**kw), data)[0])  # wall s
    b, li = min(bare), min(light)
    print(
        f"width={args.width} image_size={args.image_size} batch={args.batch} steps={args.steps} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"bare_step_ms={1000 * b / args.steps:.1f}")
    print(f"lightning_step_ms={1000 * li / args.steps:.1f}")
    print(f"lightning_overhead_pct={100 * (li - b) / b:.1f}")


if __name__ == "__main__":
    main()
