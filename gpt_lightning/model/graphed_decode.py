"""Decode steps on a GPU replayed from a CUDA graph captured once, instead of launched kernel by kernel.

Why: eager decode of our small models on a GPU is bound by the host, not by the bytes it reads. On an H100 (README,
"Measured on an H100") fp32 eager decode reached 2% of the memory-read limit, and MHA (one SDPA call per layer)
beat GQA-4 and MQA (the grouped form, ~6 calls) in 9 of the fp32 grid's 12 cells: the launches, not the KV cache,
set the time, so GQA's saving could not show. A graph launches the step's ~100-200 kernels as one.

What is captured: `GPT.static_next_logits`, a decode step whose shapes and Python values never depend on the
position (the position is a (1,) device tensor; attention reads the cache's whole preallocated buffers, masked
after it). Tokens and position are copied into fixed input tensors before each replay; the logits come back in a
fixed output tensor, overwritten by the next step.

`decode_step` is the one entry point (`stream_tokens`, `time_decode_at`): a `GraphedDecoder` on CUDA, the eager
`GPT.next_logits` elsewhere (on a CPU the fixed shape would only add work: the whole buffer is read every step).
If capture fails, the decoder warns once and decodes eagerly: same tokens, no graph.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from gpt_lightning.model.kv_cache import KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before capture (cuBLAS/SDPA workspaces, lazy init), as torch's docs do


class GraphedDecoder:
    """`model.next_logits(tokens, cache)` for one model and one cache, from a CUDA graph captured at the first call.

    The cache's buffers must stay where they are (they do: `KVCache` writes in place, `reset` only rewinds), and the
    model must stay in eval mode with its weights in place. Prefills (`last_logits`) go on as before, eagerly, into
    the same buffers. With `graph=False` the same fixed-shape step runs eagerly (how the CPU tests check it).
    """

    def __init__(self, model: nn.Module, cache: KVCache, graph: bool = True):
        device = cache.k[0].device
        self.model, self.cache = model, cache
        self.limit = min(cache.max_len, model.config.block_size)  # positions the cache and wpe both have
        self.tokens = torch.zeros(cache.k[0].size(0), dtype=torch.long, device=device)  # (B,) replay input
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) replay input
        self.use_graph = graph and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (B, vocab), the graph's output

    def _step(self) -> torch.Tensor:
        return self.model.static_next_logits(self.tokens, self.pos, self.cache)

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step. Each run writes the same keys/values at the same
        position (this call's), so warm-up and capture leave the cache as the replay that follows would."""
        device = self.tokens.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab_size) after one new token per row, tokens (B,), appended to the cache. On a graph the
        returned tensor is the graph's own output: read it (or clone it) before the next call."""
        length = self.cache.length
        if length >= self.limit:
            raise ValueError(f"sequence of {length + 1} tokens exceeds the cache's {self.limit} positions")
        if not length:  # an empty cache is a prefill: the eager path's own rule
            return self.model.next_logits(tokens, self.cache)
        self.tokens.copy_(tokens)
        self.pos.fill_(length)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # an op the graph cannot hold on this build: decode eagerly instead
                warnings.warn(f"CUDA graph capture of the decode step failed ({str(e).splitlines()[0]}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
                self.use_graph, self.graph = False, None
                torch.cuda.synchronize(self.tokens.device)
                return self.model.next_logits(tokens, self.cache)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()
        self.cache.advance(1)
        return self.logits


def decode_step(model: nn.Module, cache: KVCache, cuda_graph: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode step for this cache, tokens (B,) -> logits (B, vocab_size), advancing the cache by one: replayed
    from a CUDA graph on a GPU (unless `cuda_graph` is False), `model.next_logits` otherwise."""
    if cuda_graph and cache.k[0].device.type == "cuda" and not model.training:
        return GraphedDecoder(model, cache)
    return functools.partial(model.next_logits, cache=cache)
