"""Decode speed and KV-cache bytes over batch size x context length, for one model or a kv_groups sweep.

Where the cache, not the weights, dominates what a decode step reads (long contexts, large batches), fewer KV
heads decode faster: the GQA paper's inference claim. Each grid row holds the measured tokens/s next to what a
step reads (weights + the cache at that context) and the read-limited speed that implies, and, given the matmul
peak, the step's roofline: the slower of reading those bytes at the bandwidth and computing its FLOPs at the peak.
The bytes-read ratio of MHA over MQA bounds MQA's speed-up only where both are read-bound; at large batches the
LM head and the other linears are bound by compute for every kv_groups alike, and the roofline ratio says so.

Timing at context L: prefill L tokens, then time `new_tokens` greedy steps (L + new_tokens <= block_size).
The prefill runs once at batch 1 and its cache is copied to every row of the batch (the rows would hold the same
keys and values anyway: the bench decodes one prompt per row), so large batches do not pay B prefills.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt_lightning.common.files import atomic_file
from gpt_lightning.measure.decode_linears import linear_bytes_and_flops
from gpt_lightning.measure.limits import bracketed
from gpt_lightning.measure.timing import summarize, sync
from gpt_lightning.model import GPT, KVCache
from gpt_lightning.model import graphed_decode
from gpt_lightning.model.graphed_decode import GraphedDecoder, bucket_starts, decode_step
from gpt_lightning.model.sampling import cpu_matvec_layout, sample_next


def decode_weight_bytes(model: GPT) -> int:
    """Bytes of weights one decode step reads: every parameter but the position table (one row of it is read)."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - wpe.numel() * wpe.element_size()


def cache_bytes_per_token(model: GPT) -> int:
    c, p = model.config, model.lm_head.weight
    return 2 * c.n_layer * c.n_kv_groups * c.head_dim * p.element_size()


def flops_per_step(model: GPT, batch: int, context: int) -> int:
    """FLOPs of one decode step of `batch` rows after `context` cached positions: every linear's product (the LM
    head over the padded vocabulary) and, per layer and query head, q.k and p.v against the context + 1 keys.
    Like `bytes_read_per_step`, taken at the cell's starting context: its timed steps run at context ... context +
    new_tokens - 1, so the attention terms are low by up to new_tokens / context (e.g. 32 new tokens after 128)."""
    c = model.config
    _, linear_flops = linear_bytes_and_flops(model, batch)
    return linear_flops + 4 * batch * c.n_layer * c.n_head * c.head_dim * (context + 1)


def roofline_tokens_per_sec(batch: int, bytes_read: int, flops: int, bandwidth: float, peak: float) -> float:
    """New tokens/s if a step took the longer of reading `bytes_read` at `bandwidth` and `flops` at `peak`."""
    return batch / max(bytes_read / bandwidth, flops / peak)


def bytes_read_per_step(model: GPT, batch: int, context: int) -> int:
    """Weights once, plus every row's keys and values at `context` positions."""
    return decode_weight_bytes(model) + batch * context * cache_bytes_per_token(model)


def largest_batch(budget_bytes: float, weight_bytes: int, cache_bytes_per_token: int, context: int) -> int:
    """The largest batch whose weights + KV cache at `context` positions fit in `budget_bytes` (0: none fits)."""
    return max(0, int((budget_bytes - weight_bytes) // (cache_bytes_per_token * context)))


def effective_contexts(contexts: list[int], block_size: int, new_tokens: int) -> list[int]:
    """Each requested context, capped so that context + new_tokens stays within block_size (duplicates dropped).
    Raises ValueError when new_tokens leave no context at all (the callers refuse that setting first)."""
    if new_tokens >= block_size:
        raise ValueError(f"{new_tokens} new tokens leave no context in block_size={block_size}")
    return sorted({min(c, block_size - new_tokens) for c in contexts if c >= 1})


@torch.no_grad()
def prefilled_cache(model: GPT, batch: int, context: int, new_tokens: int, generator: torch.Generator,
                    prompt: torch.Tensor | None = None):
    """A cache for `batch` rows holding `context` prefilled positions (room for `new_tokens` more), and the first
    new token of each row. The prefill reads `prompt` (1, >= context) token ids when given, else random ids."""
    c, device = model.config, model.lm_head.weight.device
    if prompt is not None and prompt.size(1) >= context:
        prompt = prompt[:, :context].to(device)
    else:
        prompt = torch.randint(0, c.vocab_size, (1, context), generator=generator).to(device)
    one = KVCache(c.n_layer, 1, c.n_kv_groups, context, c.head_dim, device=device, dtype=model.lm_head.weight.dtype)
    with cpu_matvec_layout(model, rows=1):
        first = model.last_logits(prompt, one).argmax(-1)  # (1,)
    cache = KVCache(c.n_layer, batch, c.n_kv_groups, context + new_tokens, c.head_dim, device=device,
                    dtype=model.lm_head.weight.dtype)
    for dst, src in zip(cache.k + cache.v, one.k + one.v):
        dst[:, :, :context] = src  # (1, G, context, hd) -> every row
    cache.advance(context)
    return cache, first.expand(batch).contiguous()


@torch.no_grad()
def time_decode_at(model: GPT, batch: int, context: int, new_tokens: int, generator: torch.Generator,
                   prompt: torch.Tensor | None = None, cuda_graph: bool = True) -> float:
    """New tokens/s (all rows counted) of `new_tokens` greedy KV-cached steps after `context` prefilled positions
    (on a GPU replayed from a CUDA graph unless `cuda_graph` is False, as generate's decode)."""
    cache, nxt = prefilled_cache(model, batch, context, new_tokens, generator, prompt)
    with cpu_matvec_layout(model, rows=batch):
        step = decode_step(model, cache, cuda_graph)
        # Warm-up (oneDNN primitive set-up; on a GPU a step at the start of every key bucket the timed steps reach,
        # capturing its graph). Each writes a position the timed steps overwrite before they read it.
        graphed = isinstance(step, GraphedDecoder)
        for length in bucket_starts(context, new_tokens, cache.max_len) if graphed else [context]:
            cache.length = length
            step(nxt)
        cache.length = context  # rewind
        sync(nxt.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = sample_next(step(nxt), temperature=0)  # (B,): greedy, as generate's decode
        sync(nxt.device)
    return batch * new_tokens / (time.perf_counter() - start)


def decode_grid(models: list[GPT], batch_sizes: list[int], contexts: list[int], new_tokens: int, repeats: int,
                bandwidth: float | Callable[[], float] | None = None, seed: int = 0,
                prompt: torch.Tensor | None = None, log=print,
                peak: float | Callable[[], float] | None = None, cuda_graph: bool = True) -> list[dict]:
    """One row per (model, batch, context): tokens/s (median, min-max over `repeats` interleaved rounds), KV-cache
    bytes, bytes read per step, and (given the read `bandwidth`) the read-limited tokens/s and the fraction of it;
    given the matmul `peak` as well (FLOP/s in the models' dtype), the step's FLOPs, its roofline tokens/s, what
    bounds it ("read" or "matmul") and the fraction of it reached.

    Rounds are interleaved, and within a round the models run back to back at each (batch, context), so drift
    hits every kv_groups alike. `bandwidth` is bytes/s, or a probe measuring it: then it is measured before and
    after every (round, cell), and each round's fraction is against the mean of the two (`limits.bracketed`).
    `peak` is FLOP/s or a probe: then it is measured before and after every round (a 2048^3 product takes ~1 s
    to time on a CPU, too long to take beside every cell), each round's roofline against the mean of the two.
    On a GPU the steps replay CUDA graphs unless `cuda_graph` is False (rows say whether they did: `cuda_graph`); a
    graph's attention reads a key bucket of the cache (`graphed_decode.key_bucket`), which here is at most the
    context + new_tokens positions the cell's cache holds: up to new_tokens / context more than the
    `bytes_read_per_step` counted at the context.
    """
    for m in models:
        m.eval()
    block = min(m.config.block_size for m in models)
    ctxs = effective_contexts(contexts, block, new_tokens)
    cells = [(b, L) for L in ctxs for b in batch_sizes]
    probe = bandwidth if callable(bandwidth) else (lambda: bandwidth)
    peak_probe = peak if callable(peak) else (lambda: peak)
    rates: dict[tuple, list[float]] = {}
    bandwidths: dict[tuple, list[float]] = {}  # (model, batch, context) -> the bandwidth beside each round
    peaks: list[float] = []  # the matmul peak beside each round
    graphs = graphed_decode.GraphWatch(cuda_graph, models[0].lm_head.weight.device)
    for r in range(repeats):
        peak_before = peak_probe() if peak and bandwidth else None  # a roofline needs both
        for b, L in cells:
            def cell(b=b, L=L) -> list[float]:
                out = []
                for model in models:
                    g = torch.Generator().manual_seed(seed + L)
                    out.append(time_decode_at(model, b, L, new_tokens, g, prompt, cuda_graph))
                return out
            cell_rates, bw = bracketed(cell, probe) if bandwidth else (cell(), None)
            for i, rate in enumerate(cell_rates):
                rates.setdefault((i, b, L), []).append(rate)
                bandwidths.setdefault((i, b, L), []).append(bw)
        if peak and bandwidth:
            peaks.append((peak_before + peak_probe()) / 2)
        log(f"decode grid round {r + 1}/{repeats} done")
    graphs_ran = graphs.ran()  # asked for on a GPU, and none of this grid's captures failed
    rows = []
    for (i, b, L), values in rates.items():
        m = models[i]
        c, read = m.config, bytes_read_per_step(m, b, L)
        row = {"kv_groups": c.n_kv_groups, "attention": c.attention, "n_head": c.n_head, "batch": b, "context": L,
               "new_tokens": new_tokens, "cuda_graph": graphs_ran,
               "dtype": str(m.lm_head.weight.dtype).removeprefix("torch."),
               "tokens_per_sec": summarize(values), "kv_cache_bytes": b * L * cache_bytes_per_token(m),
               "weight_bytes": decode_weight_bytes(m), "bytes_read_per_step": read}
        if bandwidth:
            bws = bandwidths[(i, b, L)]
            bw = statistics.median(bws)
            row["read_bandwidth_bytes_per_sec"] = bw
            row["read_limit_tokens_per_sec"] = b * bw / read
            row["fraction_of_read_limit"] = statistics.median(rate * read / (b * rbw) for rate, rbw in zip(values, bws))
            if peak:
                flops, pk = flops_per_step(m, b, L), statistics.median(peaks)
                row["flops_per_step"] = flops
                row["matmul_peak_flops"] = pk
                row["roofline_tokens_per_sec"] = roofline_tokens_per_sec(b, read, flops, bw, pk)
                row["limited_by"] = "read" if read / bw >= flops / pk else "matmul"
                row["fraction_of_roofline"] = statistics.median(  # each round against its own limits
                    rate / roofline_tokens_per_sec(b, read, flops, rbw, rpk)
                    for rate, rbw, rpk in zip(values, bws, peaks))
        rows.append(row)
    return rows


def budget_rows(models: list[GPT], contexts: list[int], budget_gb: float) -> list[dict]:
    """Largest batch in `budget_gb` (weights + KV cache, in each model's dtype) per kv_groups and context."""
    out = []
    for m in models:
        for L in contexts:
            out.append({"kv_groups": m.config.n_kv_groups, "attention": m.config.attention, "context": L,
                        "budget_gb": budget_gb,
                        "largest_batch": largest_batch(budget_gb * 1e9, sum(p.numel() * p.element_size()
                                                                             for p in m.parameters()),
                                                       cache_bytes_per_token(m), L)})
    return out


def mqa_over_mha(rows: list[dict], batch: int, context: int) -> dict | None:
    """At (batch, context): MHA's bytes read per step over MQA's (the bound on MQA's speed-up when decode is
    bound by reading) next to the achieved tokens/s ratio, and where the rows have rooflines, MQA's roofline
    tokens/s over MHA's (`roofline_ratio`: the speed-up if both ran at their roofline, compute included).
    None unless both MHA and MQA rows are there."""
    at = {r["attention"]: r for r in rows if r["batch"] == batch and r["context"] == context}
    if "mha" not in at or "mqa" not in at:
        return None
    mha, mqa = at["mha"], at["mqa"]
    out = {"batch": batch, "context": context,
           "bound": mha["bytes_read_per_step"] / mqa["bytes_read_per_step"],
           "achieved": mqa["tokens_per_sec"]["median"] / mha["tokens_per_sec"]["median"]}
    if "roofline_tokens_per_sec" in mha and "roofline_tokens_per_sec" in mqa:
        out["roofline_ratio"] = mqa["roofline_tokens_per_sec"] / mha["roofline_tokens_per_sec"]
    return out


def format_grid(rows: list[dict], budget: list[dict], ratio: dict | None) -> str:
    lines = [f"{'decode grid':<12} {'kv':>3} {'batch':>5} {'ctx':>5} {'tokens/s':>9} {'min-max':>15} "
             f"{'KV cache MB':>11} {'read/step MB':>12} {'% read limit':>12} {'% roofline (bound)':>18}"]
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], -r["kv_groups"])):
        t = r["tokens_per_sec"]
        pct = f"{r['fraction_of_read_limit']:.0%}" if "fraction_of_read_limit" in r else "-"
        roof = f"{r['fraction_of_roofline']:.0%} ({r['limited_by']})" if "fraction_of_roofline" in r else "-"
        lines.append(f"{r['attention']:<12} {r['kv_groups']:>3} {r['batch']:>5} {r['context']:>5} "
                     f"{t['median']:>9.1f} {t['min']:>7.1f}-{t['max']:<7.1f} {r['kv_cache_bytes'] / 1e6:>11.1f} "
                     f"{r['bytes_read_per_step'] / 1e6:>12.1f} {pct:>12} {roof:>18}")
    if any("fraction_of_roofline" in r for r in rows):
        lines.append("(% roofline: the measured speed over the slower of reading the step's bytes at the read "
                     "bandwidth and computing its FLOPs at the matmul peak, both measured beside the rounds; "
                     "bound: which of the two)")
    if budget:
        ctxs = sorted({b["context"] for b in budget})
        lines += ["", f"largest batch in {budget[0]['budget_gb']:g} GB (weights + KV cache), by context:",
                  f"{'kv_groups':>9} " + " ".join(f"{c:>7}" for c in ctxs)]
        for g in sorted({b["kv_groups"] for b in budget}, reverse=True):
            cells = {b["context"]: b["largest_batch"] for b in budget if b["kv_groups"] == g}
            lines.append(f"{g:>9} " + " ".join(f"{cells[c]:>7}" for c in ctxs))
    if ratio:
        roof = (f", roofline ratio {ratio['roofline_ratio']:.2f}x (both at their roofline)"
                if "roofline_ratio" in ratio else "")
        lines += ["", f"MQA / MHA at batch {ratio['batch']}, context {ratio['context']}: achieved "
                      f"{ratio['achieved']:.2f}x, bytes-read bound {ratio['bound']:.2f}x{roof}"]
    return "\n".join(lines)


def plot_grid(rows: list[dict], budget: list[dict], out_dir: Path,
              names: tuple[str, str] = ("decode_vs_kv_groups.png", "largest_batch_vs_kv_groups.png"),
              ylabel: str = "decode tokens/s (median)") -> list[Path]:
    """decode_vs_kv_groups.png (one line per batch, context) and largest_batch_vs_kv_groups.png (one per context),
    or the two `names` given (compare has a decode_vs_kv_groups.png of its own); `ylabel` says what the plotted
    `tokens_per_sec["median"]` values are (compare plots arm means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullLocator

    def kv_axis(ax, groups):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(groups, labels=[str(g) for g in groups])
        ax.set_xlabel("kv_groups (KV heads)")

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = sorted({r["kv_groups"] for r in rows})
    contexts, batches = sorted({r["context"] for r in rows}), sorted({r["batch"] for r in rows})
    colors = plt.get_cmap("viridis")([i / max(1, len(contexts) - 1) * 0.85 for i in range(len(contexts))])
    styles = ["-", "--", "-.", ":", (0, (1, 3)), (0, (5, 2, 1, 2))]
    fig, ax = plt.subplots(figsize=(9, 5))
    for ci, L in enumerate(contexts):  # color: context; line style and marker: batch
        for bi, b in enumerate(batches):
            pts = sorted((r["kv_groups"], r["tokens_per_sec"]["median"]) for r in rows
                         if r["batch"] == b and r["context"] == L)
            ax.plot(*zip(*pts), color=colors[ci], linestyle=styles[bi % len(styles)], marker="os^Dvx"[bi % 6],
                    label=f"batch {b}, context {L}")
    kv_axis(ax, groups)
    ax.set(yscale="log", ylabel=ylabel, title="Decode speed against KV heads")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out_dir / names[0])
    with atomic_file(paths[-1]) as f:  # a kill mid-write leaves the old plot, not half a PNG
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    if budget:
        fig, ax = plt.subplots(figsize=(6, 4))
        for L in sorted({b["context"] for b in budget}):
            pts = sorted((b["kv_groups"], b["largest_batch"]) for b in budget if b["context"] == L)
            ax.plot(*zip(*pts), marker="o", label=f"context {L}")
        kv_axis(ax, sorted({b["kv_groups"] for b in budget}))
        ax.set(yscale="log", ylabel="largest batch",
               title=f"Largest batch in {budget[0]['budget_gb']:g} GB (weights + KV cache)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / names[1])
        with atomic_file(paths[-1]) as f:
            fig.savefig(f, dpi=120, format="png")
        plt.close(fig)
    return paths
