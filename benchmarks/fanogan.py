"""Issue-4 methods: scoring throughput next to AnoGAN's mapping, and f-AnoGAN's Lightning overhead.

1. Scoring throughput (images/s, CPU, batch 64) of each method at its paper size (64x64,
   ``width=64``): AnoGAN's and GANR's Γ-step latent mappings (Γ = 500) on the DCGAN, aCAE's and
   f-AnoGAN's single forward passes. A mapping's cost is linear in Γ (every step is one G + D
   forward and backward on the same shapes), so it is timed over ``--mapping-steps`` steps and
   scaled to Γ = 500; the encoder methods are timed whole. FLOPs per image are counted by
   ``torch.utils.flop_counter`` (deterministic, unlike timings on a shared machine). Prints
   ``<method>_images_per_s``, ``<method>_gflop_per_image``, ``<method>_speedup_vs_anogan`` and
   ``<method>_flop_ratio_vs_anogan`` (target >= 100 for fanogan and acae), and the f-AnoGAN
   paper's own comparison, a Γ = 500 mapping on f-AnoGAN's WGAN networks vs its encoder
   (``fanogan_flop_ratio_vs_mapping_same_networks``, FLOPs only).
2. f-AnoGAN's stage-1 training step (one critic update with gradient penalty per batch, one
   generator update after every ``n_critic``-th) in a Lightning Trainer vs a bare PyTorch loop
   doing the same WGAN-GP updates with the same networks, optimisers and in-memory batches.
   Pairs are interleaved (bare, Lightning, ...) and the fastest of each kept, as in
   ``overhead.py``. Prints ``fanogan_lightning_overhead_pct`` (target <= 10) from the process's
   CPU time (single-threaded, so it is the work done; wall time on a shared machine swings by
   +-30% between identical runs), and the wall-clock figure beside it.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import lightning_loop
from torch.utils.flop_counter import FlopCounterMode

from anogan_lightning.losses import (
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from anogan_lightning.methods.acae import ACAE
from anogan_lightning.methods.fanogan import FAnoGAN
from anogan_lightning.nets.dcgan import DCGANDiscriminator, DCGANGenerator, sample_uniform_z
from anogan_lightning.scoring import map_latent, map_latent_reference

PAPER_STEPS = 500  # Γ of AnoGAN and GANR


def _timed(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


FLOP_BATCH = 2  # FLOPs are linear in the batch: counted on 2 images, reported per image


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _mapping_flops(mapper, g, d, x, z) -> float:
    """FLOPs per image of a Γ = 500 mapping: steps=1 plus 499 times (steps=2 - steps=1)."""
    x, z = x[:FLOP_BATCH], z[:FLOP_BATCH]
    f1 = _flops(lambda: mapper(g, d, x, z, steps=1))
    f2 = _flops(lambda: mapper(g, d, x, z, steps=2))
    return (f1 + (f2 - f1) * (PAPER_STEPS - 1)) / FLOP_BATCH


def _mapping_seconds(mapper, g, d, x, z, mapping_steps: int, repeats: int) -> float:
    """Seconds per image of a Γ = 500 mapping of the batch, from short timed runs: steps=n
    runs n updates and n + 1 forward passes plus f(x), so (n = 1 + k) - (n = 1) is k full
    steps without the fixed part."""
    t1 = _timed(lambda: mapper(g, d, x, z, steps=1), repeats)
    tn = _timed(lambda: mapper(g, d, x, z, steps=1 + mapping_steps), repeats)
    return (t1 + (tn - t1) / mapping_steps * (PAPER_STEPS - 1)) / len(x)


def scoring_throughput(batch: int, mapping_steps: int, repeats: int) -> dict[str, float]:
    """Per-image seconds (batch ``batch``) and FLOPs of each method's scoring at its paper size,
    and the FLOPs of the f-AnoGAN paper's own comparison: a Γ = 500 AnoGAN mapping on
    f-AnoGAN's WGAN networks (FLOPs only: timing it at d = 64 takes hours on a CPU)."""
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 64, 64) * 2 - 1
    g, d = DCGANGenerator(100, 1, 64, 64), DCGANDiscriminator(1, 64, 64)
    z = sample_uniform_z(batch, 100)
    seconds, flops = {}, {}
    for name, mapper in (("anogan", map_latent), ("ganr", map_latent_reference)):
        seconds[name] = _mapping_seconds(mapper, g, d, x, z, mapping_steps, repeats)
        flops[name] = _mapping_flops(mapper, g, d, x, z)
    acae = ACAE(width=64, image_size=64).eval()
    fanogan = FAnoGAN(width=64, image_size=64).eval()
    for name, model in (("acae", acae), ("fanogan", fanogan)):
        with torch.inference_mode():
            seconds[name] = _timed(lambda m=model: m.score({"x": x}), repeats) / batch
            flops[name] = _flops(lambda m=model: m.score({"x": x[:FLOP_BATCH]})) / FLOP_BATCH
    same_networks = _mapping_flops(
        map_latent, fanogan.generator, fanogan.critic, x, fanogan.sample_z(batch)
    )
    out = {}
    for k in seconds:
        out[f"{k}_images_per_s"] = 1 / seconds[k]
        out[f"{k}_gflop_per_image"] = flops[k] / 1e9
    for k in ("ganr", "acae", "fanogan"):
        out[f"{k}_speedup_vs_anogan"] = seconds["anogan"] / seconds[k]
        out[f"{k}_flop_ratio_vs_anogan"] = flops["anogan"] / flops[k]
    out["anogan_mapping_on_wgan_gflop_per_image"] = same_networks / 1e9
    out["fanogan_flop_ratio_vs_mapping_same_networks"] = same_networks / flops["fanogan"]
    return out


# -- Lightning overhead of the WGAN-GP stage -----------------------------------------------------
def batches(n: int, batch: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.rand(batch, 1, size, size, generator=g) * 2 - 1} for _ in range(n)]


def bare_loop(model: FAnoGAN, data: list[dict]) -> tuple[float, float]:
    """The same updates as ``FAnoGAN._gan_step``, without Lightning; (wall s, CPU s)."""
    hp = model.hparams
    g, c = model.generator, model.critic
    opt_c = torch.optim.Adam(c.parameters(), lr=hp.lr, betas=tuple(hp.betas))
    opt_g = torch.optim.Adam(g.parameters(), lr=hp.lr, betas=tuple(hp.betas))
    g.train()
    c.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for it, batch in enumerate(data):
        x = batch["x"]
        g.requires_grad_(False)
        with torch.no_grad():
            x_fake = g(model.sample_z(len(x)))
        loss_c = wasserstein_critic_loss(c(x), c(x_fake)) + hp.lambda_gp * gradient_penalty(
            c, x, x_fake
        )
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()
        g.requires_grad_(True)
        if (it + 1) % hp.n_critic == 0:
            c.requires_grad_(False)
            loss_g = wasserstein_generator_loss(c(g(model.sample_z(len(x)))))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            c.requires_grad_(True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mapping-steps", type=int, default=4)
    ap.add_argument("--score-repeats", type=int, default=2)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads of the overhead part")
    ap.add_argument("--part", choices=("all", "scoring", "training"), default="all")
    args, _ = ap.parse_known_args()

    if args.part in ("all", "scoring"):
        print(f"scoring: batch={args.batch} image_size=64 width=64 mapping_steps={PAPER_STEPS}")
        for k, v in scoring_throughput(args.batch, args.mapping_steps, args.score_repeats).items():
            print(f"{k}={v:.4g}")
    if args.part in ("all", "training"):
        training_overhead(args)


def training_overhead(args: argparse.Namespace) -> None:
    """Lightning vs bare WGAN-GP stage, interleaved; prints the overhead figures. Runs with
    ``--threads`` (1) threads, so that the process's CPU time is the work done."""
    torch.set_num_threads(args.threads)
    data = batches(args.steps, args.train_batch, args.image_size)
    kw = dict(width=args.width, image_size=args.image_size, gan_steps=args.steps, encoder_steps=0)
    bare_loop(FAnoGAN(**kw), data[:2])  # warm-up
    bare, light = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        bare.append(bare_loop(FAnoGAN(**kw), data))
        torch.manual_seed(0)
        light.append(lightning_loop(FAnoGAN(**kw), data))
    print(
        f"training: width={args.width} image_size={args.image_size} batch={args.train_batch} "
        f"iterations={args.steps} n_critic=5 threads={torch.get_num_threads()}"
    )
    # CPU time of this process (one thread by default): on a shared machine other jobs' time slices
    # inflate wall time at random; the CPU time is the work each loop does
    for clock, i in (("cpu", 1), ("wall", 0)):
        b, li = min(t[i] for t in bare), min(t[i] for t in light)
        print(f"fanogan_bare_iteration_{clock}_ms={1000 * b / args.steps:.1f}")
        print(f"fanogan_lightning_iteration_{clock}_ms={1000 * li / args.steps:.1f}")
        suffix = "" if clock == "cpu" else "_wall"
        print(f"fanogan_lightning_overhead{suffix}_pct={100 * (li - b) / b:.1f}")


if __name__ == "__main__":
    main()
