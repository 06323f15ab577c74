"""Timing shared by training, evaluation and the bench: device sync, decode tokens/s, medians with min-max."""

from __future__ import annotations

import statistics
import time

import torch

from gpt_lightning.model.sampling import stream_tokens


def summarize(values: list[float]) -> dict:
    """Median with min-max over interleaved rounds: how every speed figure is reported."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(model, prompt: torch.Tensor, new_tokens: int, hf: bool = False, cuda_graph: bool = True) -> float:
    """One greedy KV-cached decode of `new_tokens` after (B, T) `prompt`: new tokens per second, all rows counted.
    `hf=True` times a Hugging Face model's own `generate` the same way. `cuda_graph`: see `stream_tokens`.
    What a `generate` call costs, all of it: the prefill, and on a CPU the repacking of every weight for decode's
    layout (`cpu_matvec_layout`, about one pass over the weights per call). The decode steps alone are timed by
    `decode_grid.time_decode_at` (the bench's "decode steps only" rows, and the grid)."""
    sync(prompt.device)
    start = time.perf_counter()
    if hf:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    else:
        for _ in stream_tokens(model, prompt, new_tokens, temperature=0, cuda_graph=cuda_graph):
            pass
    sync(prompt.device)
    return prompt.size(0) * new_tokens / (time.perf_counter() - start)


def decode_tokens_per_sec(model, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3,
                          cuda_graph: bool = True) -> float:
    """Median of `repeats` timed decodes after one warm-up (kernels, allocator)."""
    time_decode(model, prompt, new_tokens, cuda_graph=cuda_graph)
    return statistics.median(time_decode(model, prompt, new_tokens, cuda_graph=cuda_graph) for _ in range(repeats))


def end_of_run_decode(model, batch_size: int = 1, prompt_tokens: int = 16, new_tokens: int = 32,
                      repeats: int = 2) -> float:
    """The decode tokens/s a training run reports: a fixed pseudo-random prompt (decode speed does not depend on
    the text), kept inside the context so cached decoding, not re-prefill, is timed."""
    c = model.config
    prompt_tokens = min(prompt_tokens, c.block_size - 1)
    new_tokens = min(new_tokens, c.block_size - prompt_tokens)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (batch_size, prompt_tokens), generator=g).to(device)
    return decode_tokens_per_sec(model, prompt, new_tokens=new_tokens, repeats=repeats)
