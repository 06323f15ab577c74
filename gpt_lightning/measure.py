"""Measurements shared by training, evaluation and the comparison report: decode speed, peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from gpt_lightning.generation import stream_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_sec(model, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy KV-cached decode speed, new tokens per second (all batch rows counted), median of `repeats`
    after one warm-up."""
    device = prompt.device
    rates = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in stream_tokens(model, prompt, new_tokens, temperature=0):
            pass
        _sync(device)
        if i:  # the first pass warms up kernels and allocators
            rates.append(prompt.size(0) * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"
