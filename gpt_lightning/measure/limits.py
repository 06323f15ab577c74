"""The machine's own limits, printed beside every speed figure: dense matmul peak (measured), spec peaks of GPUs."""

from __future__ import annotations

import time

import torch

from gpt_lightning.measure.timing import sync


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s (best of `repeats`) for an n x n x n product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def spec_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Lightning's per-GPU table of spec FLOP/s; None on CPUs and unknown chips."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)
