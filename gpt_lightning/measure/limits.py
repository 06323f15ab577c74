"""The machine's own limits, printed beside every speed figure: dense matmul peak and memory-read bandwidth
(both measured), spec peaks of GPUs, and the decode speed those limits allow."""

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


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured memory-read bandwidth in bytes/s: the best of `repeats` sums over an `nbytes` fp32 tensor.

    A reduction reads every byte once and writes nothing, so it is the ceiling for anything bound by reading
    weights or a KV cache (decode at small batch). 1 GB is far beyond any cache.
    """
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = max(best, nbytes / (time.perf_counter() - start))
    return best


def decode_read_limit(bytes_per_step: int, bandwidth: float, batch_size: int = 1) -> float:
    """Tokens/s decode could reach if each step only had to read `bytes_per_step` (weights + KV cache) once."""
    return batch_size * bandwidth / bytes_per_step


def spec_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Lightning's per-GPU table of spec FLOP/s; None on CPUs and unknown chips."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)
