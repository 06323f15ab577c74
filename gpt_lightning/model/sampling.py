"""Sampling (temperature, top-k, top-p) and the KV-cached decode loop behind `GPT.generate`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from gpt_lightning.common.errors import UserError
from gpt_lightning.model.cpu_matmul import onednn_linear, onednn_linear_available
from gpt_lightning.model.graphed_decode import shared_decoder


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
        # In fp32: aten's bf16 argmax is scalar code, 164 us over 50,257 logits on the dev CPU against 34 us for
        # the (exact) cast and an fp32 argmax; 5% of a batch-1 bf16 decode step.
        return logits.float().argmax(dim=-1)
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
def cpu_matvec_layout(model: nn.Module, rows: int = 1, layout: str = "onednn"):
    """While decoding on a CPU, run every Linear on weights laid out for decode's few-row products.

    Decode multiplies `rows` (= batch) activations per step by every weight. aten's fp32 path (MKL) runs those
    products far below the machine's limits on the dev CPU (AMD Zen: MKL takes its AVX2 path): at 32-64 rows the
    LM head reaches ~60 GFLOP/s on one core, and bf16 matrix-vector products read ~12 GB/s. oneDNN on a weight
    prepacked for the batch (`layout="onednn"`) reaches ~150-190 GFLOP/s fp32 and ~300-370 bf16 at 32-64 rows
    and ~25-36 GB/s at one row; end to end on two threads, decode of the 4 x 256 model ran 1.4x (fp32, batch 1)
    to 1.9x (fp32, batch 32) faster than with the earlier layout (README, "Decode"). `layout="transposed"` is
    that earlier trick, kept for builds without oneDNN: `x @ W.T` on a contiguous transposed copy at one row,
    `(W @ x.T).T` up to 8 rows, plain `F.linear` beyond.
    The copies exist only inside this context (one extra copy of the weights, freed afterwards). GPUs are left
    alone.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    if layout == "onednn" and not all(onednn_linear_available(m.weight.dtype) for m in linears):
        layout = "transposed"  # e.g. fp16 weights on a CPU without avx512_fp16: oneDNN refuses to pack them

    def onednn_forward(module: nn.Linear, packed: torch.Tensor):
        bias = None if module.bias is None else module.bias.detach()

        def forward(x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out); the op flattens leading dims itself
            return onednn_linear(x if x.is_contiguous() else x.contiguous(), packed, bias)
        return forward

    def transposed_forward(module: nn.Linear, weight_t: torch.Tensor, max_rows: int = 8):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, x.size(-1))  # (M, in)
            if x2.size(0) > max_rows:  # prefill: a real GEMM, the usual path is best
                return nn.functional.linear(x, module.weight, module.bias)
            y = x2 @ weight_t if x2.size(0) == 1 else (module.weight @ x2.t()).t()  # (M, out)
            if module.bias is not None:
                y = y + module.bias
            return y.view(*x.shape[:-1], -1)
        return forward

    saved = [m.__dict__.get("forward") for m in linears]  # an instance forward set by someone else, or None
    try:
        for m in linears:
            w = m.weight.detach()
            if layout == "onednn":
                m.forward = onednn_forward(m, torch.ops.mkldnn._reorder_linear_weight(w, rows))
            else:
                m.forward = transposed_forward(m, w.t().contiguous())
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
                  generator: torch.Generator | None = None, cuda_graph: bool = True) -> Iterator[torch.Tensor]:
    """Yield each new (B,) token batch for (B, T) prompt ids, decoding with a preallocated KV cache.

    Only the last position's logits are computed per step. Positions are learned, so once the context
    fills block_size the cache is rebuilt from the last block_size tokens each step: exactly what an
    uncached model cropping its input to block_size would compute. The model is in eval mode meanwhile.
    On a GPU each step replays a CUDA graph unless `cuda_graph` is False: the decoder and its cache are kept per
    model and batch size (`graphed_decode.shared_decoder`), so later decodes replay the graphs earlier ones captured.
    """
    check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("idx must be (B, T) with T >= 1")
    was_training = model.training
    model.eval()
    try:
        if cuda_graph and idx.is_cuda:
            with shared_decoder(model, idx.size(0)) as step:
                yield from _decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                         step.cache, step)
        else:
            with cpu_matvec_layout(model, rows=idx.size(0)):
                cache = model.new_cache(idx.size(0))
                yield from _decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator, cache,
                                         functools.partial(model.next_logits, cache=cache))
    finally:
        model.train(was_training)


def _decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator, cache,
                  step) -> Iterator[torch.Tensor]:
    """The loop over an empty `cache`; `step`: tokens (B,) -> logits (B, vocab), the cache advanced by one."""
    B, T = idx.shape
    bs = model.config.block_size
    seq = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)  # allocated once
    seq[:, :T] = idx
    logits = model.last_logits(idx[:, -bs:], cache)  # prefill: (B, vocab), the LM head on the last position only
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        seq[:, T + i] = nxt
        yield nxt
        if i == max_new_tokens - 1:
            break
        if cache.length == bs:  # full: restart from the last block_size tokens at positions 0..bs-1
            cache.reset()
            logits = model.last_logits(seq[:, T + i + 1 - bs: T + i + 1], cache)
        else:
            logits = step(nxt)  # (B, vocab)


def decode(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           cuda_graph: bool = True) -> torch.Tensor:
    """(B, T) prompt ids extended to (B, T + max_new_tokens); see `stream_tokens`."""
    out = torch.empty(idx.size(0), idx.size(1) + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, : idx.size(1)] = idx
    for i, nxt in enumerate(stream_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                                 cuda_graph)):
        out[:, idx.size(1) + i] = nxt
    return out
