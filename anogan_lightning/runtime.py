"""Process-wide numerics settings a run fixes before it builds anything: CPU threads and
deterministic kernels (README, "Reproducibility")."""

from __future__ import annotations

import torch


def configure(threads: int | None, deterministic: bool | str | None) -> None:
    """Fix the intra-op thread count and ask the kernel libraries for deterministic algorithms.

    Args:
        threads: ``torch.set_num_threads`` (None keeps torch's default, one per core). The
            thread count is part of the result: a reduction split over 2 threads adds in
            another order than over 1, so the same seed gives other (equally valid) numbers.
        deterministic: the value of ``trainer.deterministic``. Lightning turns it into
            ``torch.use_deterministic_algorithms`` (``"warn"``: warn instead of failing on an
            op without a deterministic kernel); here it also sets oneDNN's deterministic
            mode (CPU convolutions) and cuDNN's, which that switch does not cover everywhere.
    """
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads={threads}: expected a positive thread count or null")
        torch.set_num_threads(int(threads))
    if deterministic:
        if hasattr(torch.backends.mkldnn, "deterministic"):
            torch.backends.mkldnn.deterministic = True
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
