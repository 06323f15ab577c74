"""Measurements shared by training, evaluation and the comparison report: decode speed, peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from gpt_lightning.generation import stream_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(model, prompt: torch.Tensor, new_tokens: int, hf: bool = False) -> float:
    """One greedy KV-cached decode of `new_tokens` after (B, T) `prompt`: new tokens per second, all rows counted.
    `hf=True` times a Hugging Face model's own `generate` the same way."""
    sync(prompt.device)
    start = time.perf_counter()
    if hf:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    else:
        for _ in stream_tokens(model, prompt, new_tokens, temperature=0):
            pass
    sync(prompt.device)
    return prompt.size(0) * new_tokens / (time.perf_counter() - start)


def decode_tokens_per_sec(model, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Median of `repeats` timed decodes after one warm-up (kernels, allocator)."""
    time_decode(model, prompt, new_tokens)
    return statistics.median(time_decode(model, prompt, new_tokens) for _ in range(repeats))


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


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"
