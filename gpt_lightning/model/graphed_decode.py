"""Decode steps on a GPU replayed from CUDA graphs captured once, instead of launched kernel by kernel.

Why: eager decode of our small models on a GPU is bound by the host, not by the bytes it reads. On an H100 (README,
"Measured on an H100") fp32 eager decode reached 2% of the memory-read limit, and MHA (one SDPA call per layer)
beat GQA-4 and MQA (the grouped form, ~6 calls) in 9 of the fp32 grid's 12 cells: the launches, not the KV cache,
set the time, so GQA's saving could not show. A graph launches the step's ~100-200 kernels as one.

What is captured: `GPT.static_next_logits`, a decode step whose shapes and Python values never depend on the
position (the position is a (1,) device tensor; attention reads a fixed prefix of the cache's preallocated buffers,
masked after the position). The prefix is a key bucket (`key_bucket`: the next power of two of the filled positions,
at least GRAPH_MIN_KEYS), one graph per bucket, captured when a step first needs it: a step reads at most twice the
keys it needs (or 64), not the whole block_size cache. Tokens and position are copied into fixed input tensors
before each replay; the logits come back in the bucket graph's own output tensor, overwritten by its next replay.

Entry points: `decode_step` (a decoder over a cache the caller owns: the decode grid, with the capture in its
untimed warm-up step) and `shared_decoder` (a decoder with its own cache, kept per model and batch size across
decodes, so `generate`'s graphs are captured once, not at every call). On a CPU `decode_step` is the eager
`GPT.next_logits`; with deterministic algorithms on (CUDA's deterministic `index_copy_` checks its indices on the
host, which a capture cannot hold) so is every step on a GPU, `shared_decoder`'s included. If a capture fails, that decoder warns, appends the reason to `capture_failures`
(what the bench and evaluate count to say whether graphs ran), and decodes eagerly through `next_logits` from then
on: the same tokens, no graph.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from gpt_lightning.model.kv_cache import KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before capture (cuBLAS/SDPA workspaces, lazy init), as torch's docs do
GRAPH_MIN_KEYS = 64  # the smallest key bucket: short contexts share one graph

capture_failures: list[str] = []  # this process's failed captures: what the bench and evaluate report


class GraphWatch:
    """Whether decode steps replayed CUDA graphs over a stretch of work (the bench's, a grid's, evaluate's): they
    were asked for on a GPU, deterministic algorithms were off (under them decode is eager) and no capture failed
    since the watch began (a failure decodes eagerly from then on)."""

    def __init__(self, asked: bool, device: torch.device):
        self.asked = (asked and torch.device(device).type == "cuda"
                      and not torch.are_deterministic_algorithms_enabled())
        self.start = len(capture_failures)

    def failures(self) -> list[str]:
        """The reasons of the captures that failed since the watch began."""
        return capture_failures[self.start:]

    def ran(self) -> bool:
        return self.asked and not self.failures()


def key_bucket(n_keys: int, limit: int) -> int:
    """Cache positions a graph reads for a step whose cache holds `n_keys` (the new token's included): the next power
    of two, at least GRAPH_MIN_KEYS, at most `limit` (the cache's length)."""
    return min(limit, max(GRAPH_MIN_KEYS, 1 << (n_keys - 1).bit_length()))


def weights_fingerprint(model: nn.Module) -> tuple:
    """Where the model's weights live: a graph reads them at these addresses (and dtypes), whatever their values."""
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def parameter_slots(model: nn.Module) -> list[tuple[dict, str]]:
    """(a module's parameter dict, a name) for every parameter: reading the addresses through them takes ~8 us for
    the 6-layer model against ~75 us for walking `model.parameters()`, cheap enough to check before every replay.
    The dicts hold the parameters, not the modules, so a decoder keeping them keeps no model alive."""
    return [(m._parameters, name) for m in model.modules() for name, p in m._parameters.items() if p is not None]


def slot_addresses(slots: list[tuple[dict, str]]) -> list[int]:
    return [params[name].data_ptr() for params, name in slots]


class GraphedDecoder:
    """`model.next_logits(tokens, cache)` for one model and one cache, replayed from CUDA graphs, one per key bucket,
    each captured at the first step that needs it.

    The cache's buffers must stay where they are (they do: `KVCache` writes in place, `reset` only rewinds). In-place
    weight updates (an optimizer step) are seen by the graphs as they are; weights that moved since the graphs were
    captured (a state dict loaded by assignment, `.to()`: the graphs would read the old, maybe freed, memory) are
    caught before the next replay, which captures afresh, or refuses if they left the cache's device or dtype. Prefills (`last_logits`, or a step into an empty cache) go on eagerly into the same buffers, and so does
    a step under autocast (whose cast weights would not outlive the capture). With `graph=False` the same
    fixed-shape bucketed step runs eagerly (how the CPU tests check it). The model is held weakly: a decoder kept in
    `shared_decoder`'s table must not keep its model alive.
    """

    def __init__(self, model: nn.Module, cache: KVCache, graph: bool = True):
        device = cache.k[0].device
        self._model = weakref.ref(model)
        self.cache = cache
        self.limit = min(cache.max_len, model.config.block_size)  # positions the cache and wpe both have
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode (validation hooks)
            self.tokens = torch.zeros(cache.k[0].size(0), dtype=torch.long, device=device)  # (B,) replay input
            self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) replay input
        self.use_graph = graph and device.type == "cuda"
        self.failed = False  # a capture failed: eager next_logits from then on
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.fingerprint = weights_fingerprint(model)
        self._slots = parameter_slots(model)
        self._graph_addresses = slot_addresses(self._slots)  # where the weights were when the graphs were captured
        self.in_use = False  # a decode is running on this decoder's cache (shared_decoder)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the decoder's model is gone")
        return model

    @property
    def graphed(self) -> bool:
        """Steps replay graphs (on a GPU, deterministic algorithms off, and no capture has failed)."""
        return self.use_graph and not self.failed and not torch.are_deterministic_algorithms_enabled()

    def _step(self, view: KVCache) -> torch.Tensor:
        return self.model.static_next_logits(self.tokens, self.pos, view)

    def _capture(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture one step reading `keys` positions. Each run writes the same
        keys/values at the same position (this call's), so warm-up and capture leave the cache as the replay that
        follows would. Everything on the cache's device, whichever device is current."""
        device = self.tokens.device
        view = self.cache.prefix(keys)  # (B, G, keys, hd) views: fixed addresses for the graph
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        self._step(view)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a DataLoader's pin-memory thread may call CUDA meanwhile without breaking the capture
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    logits = self._step(view)
            finally:  # a failed capture's exit raises before it restores the stream it made current
                torch.cuda.set_stream(current)
        return graph, logits

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab_size) after one new token per row, tokens (B,), appended to the cache. From a graph the
        returned tensor is the graph's own output: read it (or clone it) before the next call."""
        model = self.model  # raises if it is gone: a replay would read freed weights
        length = self.cache.length
        if length >= self.limit:
            raise ValueError(f"sequence of {length + 1} tokens exceeds the cache's {self.limit} positions")
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} for a cache of batch {self.tokens.size(0)}")
        if (not length or self.failed or torch.is_autocast_enabled(self.tokens.device.type)
                or (self.use_graph and torch.are_deterministic_algorithms_enabled())):
            return model.next_logits(tokens, self.cache)  # a prefill, a failed capture, autocast, determinism: eager
        keys = key_bucket(length + 1, self.limit)
        self.tokens.copy_(tokens)
        self.pos.fill_(length)
        if not self.use_graph:
            logits = self._step(self.cache.prefix(keys))
        else:
            self._forget_graphs_if_weights_moved(model)
            if keys not in self.graphs:
                try:
                    self.graphs[keys] = self._capture(keys)
                except RuntimeError as e:  # an op the graph cannot hold on this build: decode eagerly instead
                    cause = e.__context__ or e  # capture_end's own error hides the op's behind it
                    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
                    capture_failures.append(reason)
                    warnings.warn(f"CUDA graph capture of the decode step failed ({reason}); decoding eagerly",
                                  RuntimeWarning, stacklevel=2)
                    self.failed, self.graphs = True, {}
                    torch.cuda.synchronize(self.tokens.device)
                    return model.next_logits(tokens, self.cache)
            graph, logits = self.graphs[keys]
            graph.replay()
        self.cache.advance(1)
        return logits

    def _forget_graphs_if_weights_moved(self, model: nn.Module) -> None:
        """Drop graphs captured against weights that have since moved (they would read the old addresses); the
        steps that follow capture new ones. Weights now on another device or in another dtype than the cache's
        cannot decode into it at all: a clear error instead of a wrong read."""
        addresses = slot_addresses(self._slots)
        if addresses == self._graph_addresses:
            return
        weight, cache = model.lm_head.weight, self.cache.k[0]
        if weight.device != cache.device or weight.dtype != cache.dtype:
            raise ValueError(f"the model's weights moved to {weight.device} {weight.dtype} while this decoder's cache "
                             f"is {cache.device} {cache.dtype}: start a new decode (a new decoder) after moving a model")
        self.graphs, self._graph_addresses = {}, addresses
        self.fingerprint = weights_fingerprint(model)


def bucket_starts(context: int, new_tokens: int, limit: int) -> list[int]:
    """The cache lengths at which steps from `context` to `context + new_tokens - 1` first need each key bucket: a
    warm-up step at each captures every graph those steps replay, before any clock starts."""
    starts: dict[int, int] = {}
    for length in range(context, min(context + new_tokens, limit)):
        starts.setdefault(key_bucket(length + 1, limit), length)
    return sorted(starts.values())


def decode_step(model: nn.Module, cache: KVCache, cuda_graph: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode step for this cache, tokens (B,) -> logits (B, vocab_size), advancing the cache by one: replayed
    from CUDA graphs on a GPU (unless `cuda_graph` is False), `model.next_logits` otherwise."""
    if (cuda_graph and cache.k[0].device.type == "cuda" and not model.training
            and not torch.are_deterministic_algorithms_enabled()):
        return GraphedDecoder(model, cache)
    return functools.partial(model.next_logits, cache=cache)


# model -> {batch size: decoder}, the last batch size decoded only (one block_size cache per model, not one per
# batch size); weak on the model, and the decoders hold it weakly too, so both go together
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def shared_decoder(model: nn.Module, batch: int) -> Iterator[GraphedDecoder]:
    """A `GraphedDecoder` over its own block_size cache (emptied) for this model and batch size, kept across decodes:
    the graphs one decode captured, the next replays (a capture costs a few eager steps and a synchronisation).
    A new one is built when the model's weights moved or changed dtype (`.to()`, a state dict loaded by
    assignment), and a second decode running at the same time (two open `stream_tokens`) gets a fresh one of its
    own: one cache cannot serve two. A decoder whose capture failed is kept: it decodes eagerly, without retrying."""
    decoders = _shared.setdefault(model, {})
    decoder = decoders.get(batch)
    device = next(model.parameters()).device
    if (decoder is None or decoder.in_use or decoder.fingerprint != weights_fingerprint(model)
            or decoder.cache.k[0].device != device):
        with torch.inference_mode(False):  # a cache made in inference mode could not be written outside it
            decoder = GraphedDecoder(model, model.new_cache(batch))
        if not any(d.in_use for d in decoders.values()):
            decoders.clear()  # only the last batch size is kept
            decoders[batch] = decoder
    else:  # zeros past the filled positions: a bucket reads them (masked), and a stale inf or NaN would leak
        with torch.no_grad():
            for t in decoder.cache.k + decoder.cache.v:
                t.zero_()
    decoder.cache.reset()
    decoder.in_use = True
    try:
        yield decoder
    finally:
        decoder.in_use = False
