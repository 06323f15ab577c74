"""Sampling (temperature, top-k, top-p) and the KV-cached decode loop behind `GPT.generate`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from gpt_lightning.common.errors import UserError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1, or null for no top-k filtering")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1], or null for no nucleus filtering")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of (B, V) logits -> (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextmanager
def cpu_matvec_layout(model: nn.Module, max_rows: int = 8):
    """While decoding on a CPU, run every Linear's few-row products on weights laid out for them.

    At one token per step, decode is a chain of matrix-vector products bound by reading the weights. On the
    dev CPU, `F.linear(x, W)` with one row reads W at ~9 GB/s (a transposed-B GEMM path), while `x @ W.T` on a
    contiguous transposed copy reaches ~24 GB/s; with a few rows, `(W @ x.T).T` is the fast form. The copies
    exist only inside this context (one extra copy of the weights, freed afterwards). GPUs are left alone.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if next(model.parameters()).device.type != "cpu":
        yield
        return

    def fast_forward(module: nn.Linear, weight_t: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, x.size(-1))  # (M, in)
            if rows.size(0) > max_rows:  # prefill: a real GEMM, the usual path is best
                return nn.functional.linear(x, module.weight, module.bias)
            y = rows @ weight_t if rows.size(0) == 1 else (module.weight @ rows.t()).t()  # (M, out)
            if module.bias is not None:
                y = y + module.bias
            return y.view(*x.shape[:-1], -1)
        return forward

    saved = [m.__dict__.get("forward") for m in linears]  # an instance forward set by someone else, or None
    try:
        for m in linears:
            m.forward = fast_forward(m, m.weight.detach().t().contiguous())
        yield
    finally:
        for m, forward in zip(linears, saved):
            if forward is None:
                m.__dict__.pop("forward", None)  # back to nn.Linear.forward
            else:
                m.forward = forward


@torch.no_grad()
def stream_tokens(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield each new (B,) token batch for (B, T) prompt ids, decoding with a preallocated KV cache.

    Only the last position's logits are computed per step. Positions are learned, so once the context
    fills block_size the cache is rebuilt from the last block_size tokens each step: exactly what an
    uncached model cropping its input to block_size would compute. The model is in eval mode meanwhile.
    """
    check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("idx must be (B, T) with T >= 1")
    was_training = model.training
    model.eval()
    try:
        with cpu_matvec_layout(model):
            yield from _decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator)
    finally:
        model.train(was_training)


def _decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator) -> Iterator[torch.Tensor]:
    B, T = idx.shape
    bs, vocab = model.config.block_size, model.config.vocab_size
    seq = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)  # allocated once
    seq[:, :T] = idx
    cache = model.new_cache(B)
    h = model.hidden_states(idx[:, -bs:], cache)  # prefill: (B, min(T, bs), C)
    for i in range(max_new_tokens):
        logits = model.lm_head(h[:, -1])[:, :vocab]  # (B, vocab): last position only
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        seq[:, T + i] = nxt
        yield nxt
        if i == max_new_tokens - 1:
            break
        if cache.length == bs:  # full: restart from the last block_size tokens at positions 0..bs-1
            cache.reset()
            h = model.hidden_states(seq[:, T + i + 1 - bs: T + i + 1], cache)
        else:
            h = model.hidden_states(nxt[:, None], cache)


def decode(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) prompt ids extended to (B, T + max_new_tokens); see `stream_tokens`."""
    out = torch.empty(idx.size(0), idx.size(1) + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, : idx.size(1)] = idx
    for i, nxt in enumerate(stream_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator)):
        out[:, idx.size(1) + i] = nxt
    return out
