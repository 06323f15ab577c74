"""Decode's linear layers alone, at each decode batch size, against this machine's limits.

A decode step multiplies `rows` (= batch size) activations by every weight once: per block c_attn, c_proj, c_fc
and the MLP's c_proj, then the LM head. `time_linears` runs exactly those products, in decode's weight layout
(`cpu_matvec_layout`), one pass over all of them in model order as a step does, so each weight comes from memory as
it does in decode (the weights of the bench shape, 60-120 MB, are larger than a CPU's last-level cache). A pass
can go no faster than its roofline: reading its weights once at the memory-read bandwidth (few rows), or its FLOPs
at the matmul peak (many rows), whichever takes longer. `linears_row` puts a measured pass beside both limits,
each measured just before and after it (`limits.bracketed`): the machine's limits move while a bench runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from gpt_lightning.measure.timing import summarize, sync
from gpt_lightning.model.sampling import cpu_matvec_layout


def decode_linears(model: nn.Module) -> list[nn.Linear]:
    """Every Linear a decode step runs, in model order (the tied LM head once)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def linear_bytes_and_flops(model: nn.Module, rows: int) -> tuple[int, int]:
    """(weight + bias bytes one pass reads, FLOPs of one pass at `rows` rows)."""
    linears = decode_linears(model)
    nbytes = sum(m.weight.numel() * m.weight.element_size()
                 + (0 if m.bias is None else m.bias.numel() * m.bias.element_size()) for m in linears)
    return nbytes, 2 * rows * sum(m.weight.numel() for m in linears)


@torch.no_grad()
def time_linears(model: nn.Module, rows: int, passes: int = 10) -> float:
    """Seconds per pass over all of decode's linears at `rows` rows, in decode's weight layout (best of 3)."""
    linears = decode_linears(model)
    w = linears[0].weight
    xs = [torch.randn(rows, m.in_features, dtype=w.dtype, device=w.device) for m in linears]  # (rows, in)
    best = float("inf")
    with cpu_matvec_layout(model, rows=rows):
        for m, x in zip(linears, xs):  # warm-up: kernel and primitive set-up
            m(x)
        for _ in range(3):
            sync(w.device)
            start = time.perf_counter()
            for _ in range(passes):
                for m, x in zip(linears, xs):
                    m(x)
            sync(w.device)
            best = min(best, (time.perf_counter() - start) / passes)
    return best


def linears_row(name: str, model: nn.Module, rows: int, rounds: list[tuple[float, float, float]]) -> dict:
    """One table row from `rounds` of (seconds per pass, matmul peak FLOP/s, read bandwidth bytes/s), each round
    against the limits measured beside it; medians with min-max over the rounds."""
    nbytes, flops = linear_bytes_and_flops(model, rows)
    seconds = [s for s, _, _ in rounds]
    of_peak = [flops / s / peak for s, peak, _ in rounds]
    of_read = [nbytes / s / bw for s, _, bw in rounds]
    # the roofline: the larger of the read time and the compute time, over the measured time
    of_roofline = [max(nbytes / bw, flops / peak) / s for s, peak, bw in rounds]
    read_bound = 2 * sum(nbytes / bw >= flops / peak for _, peak, bw in rounds) >= len(rounds)  # most rounds
    return {"name": name, "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "rows": rows,
            "linears": len(decode_linears(model)), "weight_bytes": nbytes, "flops_per_pass": flops,
            "seconds_per_pass": summarize(seconds),
            "flops_per_sec": flops / statistics.median(seconds),
            "read_bytes_per_sec": nbytes / statistics.median(seconds),
            "matmul_peak_flops": statistics.median(p for _, p, _ in rounds),
            "read_bandwidth_bytes_per_sec": statistics.median(b for _, _, b in rounds),
            "fraction_of_matmul_peak": summarize(of_peak),
            "fraction_of_read_bandwidth": summarize(of_read),
            "bound": "read" if read_bound else "matmul",
            "fraction_of_roofline": summarize(of_roofline)}


def measure_decode_linears(models: dict[str, nn.Module], batch_sizes: list[int], repeats: int,
                           peak: Callable[[torch.dtype], float], bandwidth: Callable[[], float],
                           log=print) -> list[dict]:
    """Rows per (model, batch size): `repeats` interleaved rounds, each pass timed between two measurements of the
    matmul peak in the model's dtype (`peak(dtype)`) and of the read bandwidth (`bandwidth()`)."""
    rounds: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for r in range(repeats):
        for rows in batch_sizes:
            for name, model in models.items():
                dtype = model.lm_head.weight.dtype
                before = peak(dtype), bandwidth()
                seconds = time_linears(model, rows)
                after = peak(dtype), bandwidth()
                rounds.setdefault((name, rows), []).append(
                    (seconds, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
        log(f"decode linears round {r + 1}/{repeats} done")
    return [linears_row(name, models[name], rows, rs) for (name, rows), rs in rounds.items()]


def format_linears(rows: list[dict]) -> str:
    lines = [f"{'decode linears alone (decode layout)':<40} {'rows':>4} {'ms/pass':>8} {'GFLOP/s':>8} {'% peak':>7} "
             f"{'GB/s':>6} {'% read':>7} {'bound':>6} {'% of bound':>10} {'min-max':>9}"]
    for r in rows:
        f = r["fraction_of_roofline"]
        lines.append(f"{r['name'] + ' (' + str(r['linears']) + ' linears)':<40} {r['rows']:>4} "
                     f"{r['seconds_per_pass']['median'] * 1e3:>8.2f} {r['flops_per_sec'] / 1e9:>8.0f} "
                     f"{r['fraction_of_matmul_peak']['median']:>7.0%} {r['read_bytes_per_sec'] / 1e9:>6.1f} "
                     f"{r['fraction_of_read_bandwidth']['median']:>7.0%} {r['bound']:>6} {f['median']:>10.0%} "
                     f"{f['min']:>4.0%}-{f['max']:<4.0%}")
    lines.append("(bound: what limits a pass, reading its weights once at the read bandwidth or its FLOPs at the "
                 "matmul peak, each measured beside every round; % of bound: that time over the measured one)")
    return "\n".join(lines)
