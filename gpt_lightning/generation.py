"""Sampling (temperature, top-k, top-p) and the KV-cached decode loop behind `GPT.generate`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt_lightning.errors import UserError


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
    finally:
        model.train(was_training)


def decode(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) prompt ids extended to (B, T + max_new_tokens); see `stream_tokens`."""
    out = torch.empty(idx.size(0), idx.size(1) + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, : idx.size(1)] = idx
    for i, nxt in enumerate(stream_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator)):
        out[:, idx.size(1) + i] = nxt
    return out
