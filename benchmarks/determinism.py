"""What reproducibility costs: AnoGAN's training step and latent mapping at the main job's size
(width 16, 32x32, batch 64) with deterministic kernels on and off, at one thread and at the
default thread count. Each setting runs in its own process (the switches are process-wide).

Prints ``train_ms_<setting>``, ``map_ms_<setting>`` (wall per step) and
``determinism_cost_pct`` (deterministic vs not, default threads, training + mapping).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SETTINGS = {  # name: (deterministic, threads)
    "fast": (False, None),
    "deterministic": (True, None),
    "deterministic_1thread": (True, 1),
}


def _child(deterministic: bool, threads: int | None, steps: int) -> None:
    sys.path.insert(0, str(HERE))
    from common import lightning_loop

    from anogan_lightning import runtime
    from anogan_lightning.methods.anogan import AnoGAN
    from anogan_lightning.scoring import map_latent

    runtime.configure(threads, deterministic)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(0)
    model = AnoGAN(latent_dim=100, width=16, image_size=32, progress=False)
    data = [{"x": torch.rand(64, 1, 32, 32) * 2 - 1} for _ in range(steps)]
    lightning_loop(model, data[:2])  # warm-up (allocations, oneDNN kernel creation)
    wall, _ = lightning_loop(model, data)
    x = data[0]["x"]
    z = torch.rand(64, 100) * 2 - 1
    model.eval()
    map_latent(model.generator, model.discriminator, x, z, steps=2, lam=0.1, lr=0.05)
    t0 = time.perf_counter()
    map_latent(model.generator, model.discriminator, x, z, steps=steps, lam=0.1, lr=0.05)
    mapping = time.perf_counter() - t0
    print(f"{wall / steps * 1e3:.2f} {mapping / steps * 1e3:.2f} {torch.get_num_threads()}")


def main() -> None:
    steps = 20
    out = {}
    for name, (det, threads) in SETTINGS.items():
        args = [sys.executable, __file__, "--child", str(int(det)), str(threads or 0), str(steps)]
        line = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        train_ms, map_ms, n = line.split()[-3:]
        out[name] = (float(train_ms), float(map_ms))
        print(f"train_ms_{name}={train_ms}")
        print(f"map_ms_{name}={map_ms}")
        print(f"threads_{name}={n}")
    fast, det = sum(out["fast"]), sum(out["deterministic"])
    print(f"determinism_cost_pct={100 * (det / fast - 1):.1f}")
    one = sum(out["deterministic_1thread"])
    print(f"one_thread_cost_pct={100 * (one / det - 1):.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        det, threads, steps = (int(a) for a in sys.argv[2:5])
        _child(bool(det), threads or None, steps)
    else:
        main()
