"""Attention kernels, training step time and decode speed for MHA, GQA and MQA at one shape, in one process.

    python tests/gpu/probe.py OUT.json [--kv 12,4,1] [--steps N] [--decode-batches 1,64] [hydra overrides...]

The shape comes from the project's own config (e.g. `model=gpt2 data.batch_size=32`); each `--kv` value is a
variant (G = n_heads is MHA, 1 is MQA). For every variant and training dtype (bf16 autocast where the device has
it, and fp32):
- which SDPA backends accept the training-shape q/k/v alone (forward + backward), with torch's reason for a refusal;
- which backend(s) the model's own training step dispatched to (profiler, aten op names);
- training tokens/s and step time of the bare loop (fused AdamW, clipping), MFU against the card's dense spec peak.
Then decode tokens/s per variant and batch size at the end of the context (the last `--decode-new` positions of
block_size), prefill excluded, with the bytes one decode step must read (weights + KV cache); on a GPU both
replayed from a CUDA graph and launched eagerly (`cuda_graph`), in alternating repeats.
First, once: the fused LM head + loss alone at the training step's rows, per chunk size, against the unfused head
(`loss_probe`: ms per forward + backward, peak allocation), in each training dtype.
Writes a run record (kind "bench", the tables under `details`) after every variant, so a timeout keeps what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpt_lightning.common.device import cpu_has_bf16  # noqa: E402
from gpt_lightning.data.tokens import get_encoding  # noqa: E402
from gpt_lightning.measure.limits import spec_peak  # noqa: E402
from gpt_lightning.measure.sdpa_backends import accepted_backends, backends_that_ran, sdpa_inputs  # noqa: E402
from gpt_lightning.measure.timing import sync  # noqa: E402
from gpt_lightning.measure.training_speed import TrainContender  # noqa: E402
from gpt_lightning.model import GPT, kv_cache_bytes_per_token, lm_head_loss  # noqa: E402
from gpt_lightning.model.loss import chunk_rows_for  # noqa: E402
from gpt_lightning.model import graphed_decode  # noqa: E402
from gpt_lightning.model.optim import make_optimizer  # noqa: E402
from gpt_lightning.model.sampling import stream_tokens  # noqa: E402
from gpt_lightning.training.model_config import gpt_config_from_cfg  # noqa: E402
from gpt_lightning.training.run_record import RunRecord  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def variant_config(cfg, kv: int, vocab: int):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"attention": {"type": "gqa", "kv_groups": kv}})  # gqa spans MHA..MQA by count
    return gpt_config_from_cfg(cfg, vocab)


def train_probe(config, dtype, batch: int, steps: int, warmup: int, optim: dict, clip: float, device) -> dict:
    """SDPA acceptance at this shape, the backend(s) a training step ran, and bare-loop step time."""
    T, hd = config.block_size, config.head_dim
    q, k, v = sdpa_inputs(batch, config.n_head, config.n_kv_groups, T, hd, dtype, device)
    accepted = accepted_backends(q, k, v)
    del q, k, v
    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = make_optimizer(model, optim, fused=device.type in ("cuda", "cpu"))
    x = torch.randint(0, config.vocab_size, (batch, T), device=device)
    contender = TrainContender("probe", model, opt, x, torch.roll(x, -1, 1),
                               autocast_dtype=dtype if dtype != torch.float32 else None, clip=clip)
    contender.run(warmup)
    ran = backends_that_ran(contender.step)
    rates = [contender.run(steps) for _ in range(2)]
    tokens_per_sec = max(rates)  # best of two: the floor of this step's time, as the spec peak is a ceiling
    peak = spec_peak(device, dtype)
    flops = model.flops_per_token(T)
    del contender, model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"accepted": accepted, "ran": ran, "tokens_per_sec": tokens_per_sec,
            "step_ms": batch * T / tokens_per_sec * 1e3, "flops_per_token": flops,
            "spec_peak_flops": peak, "mfu_spec": tokens_per_sec * flops / peak if peak else None}


def decode_step_seconds(model, prompt: torch.Tensor, new: int, cuda_graph: bool = True) -> float:
    """Seconds per decode step of the public cached decode loop (`stream_tokens`, greedy): the clock starts at the
    second yielded token, after the prefill and the first one-token step (which on a GPU may capture a graph), and
    stops after the last, so the `new - 2` one-token steps after it against the KV cache are timed."""
    if new < 3:
        raise ValueError(f"--decode-new {new}: at least 3 tokens (a prefill, an untimed step, a timed one)")
    steps = stream_tokens(model, prompt, new, temperature=0, cuda_graph=cuda_graph)
    next(steps), next(steps)
    sync(prompt.device)
    start = time.perf_counter()
    for _ in steps:
        pass
    sync(prompt.device)
    return (time.perf_counter() - start) / (new - 2)


def decode_probe(config, dtype, batches: list[int], new: int, repeats: int, device) -> list[dict]:
    """Decode tokens/s at the end of the context: a prompt of block_size - new tokens, then `new` greedy tokens,
    so the timed steps read a KV cache of block_size - new .. block_size - 1 positions."""
    torch.manual_seed(0)
    model = GPT(config).to(device=device, dtype=dtype).eval()
    prompt_len = config.block_size - new
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = kv_cache_bytes_per_token(config.n_layer, config.n_kv_groups, config.head_dim, dtype)
    mean_len = prompt_len + new / 2  # mean cache length over the timed steps
    rows = []
    modes = [True, False] if device.type == "cuda" else [False]  # graphed and eager alternate on a GPU
    graphs = graphed_decode.GraphWatch(True, device)
    for b in batches:
        prompt = torch.randint(0, config.vocab_size, (b, prompt_len), device=device)
        times: dict[bool, list[float]] = {graph: [] for graph in modes}
        for graph in modes:
            decode_step_seconds(model, prompt, new, graph)  # warm-up: the graphs of every key bucket
        for _ in range(repeats):
            for graph in modes:
                times[graph].append(decode_step_seconds(model, prompt, new, graph))
        for graph, seconds in times.items():
            step = statistics.median(seconds)
            # cuda_graph: asked for; graphs_ran: and no capture failed (a failure decodes eagerly)
            ran = graph and graphs.ran()
            rows.append({"batch": b, "context": config.block_size, "cuda_graph": graph, "graphs_ran": ran,
                         "step_ms": step * 1e3,
                         "tokens_per_sec": b / step, "bytes_per_step": weights + kv_per_token * mean_len * b,
                         "kv_bytes_per_step": kv_per_token * mean_len * b, "weight_bytes": weights})
        del prompt
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


LOSS_CHUNK_ROWS = (None, 2048, 4096, 8192)  # None: lm_head_loss's default, CHUNK_ELEMENTS // padded vocab


def loss_probe(config, dtype, n_rows: int, repeats: int, device) -> list[dict]:
    """The fused LM head + loss (`lm_head_loss`, as the training step runs it: fp32 weight, bf16 autocast or fp32)
    alone, forward + backward at the training step's n_rows = batch x block_size rows, for each chunk size in
    LOSS_CHUNK_ROWS, against the unfused head (the whole (N, V) logits, then `F.cross_entropy`). Per variant: ms per
    call (median, min-max of `repeats` interleaved rounds) and, on CUDA, the peak allocation above what was
    allocated before the call. Why: on an H100 the bench's bf16 step ran slower with the fused head (25 chunks of
    656 rows at 16 x 1024) than with the unfused one; this says which chunk size, if any, recovers it."""
    torch.manual_seed(0)
    V, C, vocab = config.padded_vocab_size, config.n_embd, config.vocab_size
    w = (torch.randn(V, C, device=device) * 0.02).requires_grad_()  # (V, C), fp32 as the model's weight
    h = torch.randn(n_rows, C, device=device).requires_grad_()  # (N, C) final hidden states
    t = torch.randint(0, vocab, (n_rows,), device=device)
    variants = {}
    for rows in LOSS_CHUNK_ROWS:
        per_chunk = chunk_rows_for(n_rows, V, rows)
        variants.setdefault(per_chunk, lambda r=per_chunk: lm_head_loss(h, w, t, vocab, chunk_rows=r))
    variants["unfused"] = lambda: F.cross_entropy(F.linear(h, w)[:, :vocab].float(), t)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())

    def call(fn) -> float:
        h.grad = w.grad = None
        sync(device)
        start = time.perf_counter()
        with autocast:
            loss = fn()
        loss.backward()
        sync(device)
        return time.perf_counter() - start

    peaks = {}
    for key, fn in variants.items():  # warm-up, and the peak allocation of one call
        h.grad = w.grad = None  # the last variant's gradients are not this one's baseline
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        call(fn)
        peaks[key] = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    times: dict = {key: [] for key in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            times[key].append(call(fn))
    rows = []
    for key, seconds in times.items():
        rows.append({"head": "unfused" if key == "unfused" else "fused", "rows": n_rows,
                     "chunk_rows": None if key == "unfused" else key,
                     "chunks": None if key == "unfused" else -(-n_rows // key),
                     "ms": statistics.median(seconds) * 1e3, "ms_min": min(seconds) * 1e3,
                     "ms_max": max(seconds) * 1e3, "peak_bytes": peaks[key]})
    del w, h, t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--kv", default="12,4,1", help="KV-head counts (variants); n_heads is MHA, 1 is MQA")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-batches", default="1,64")
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: data.batch_size)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="training dtypes to probe (bf16 only where native)")
    ap.add_argument("--loss-repeats", type=int, default=3, help="interleaved rounds of the LM head + loss probe")
    args, overrides = ap.parse_known_args()
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    wanted = args.dtypes.split(",")
    dtypes = ([torch.bfloat16] if bf16 and "bf16" in wanted else []) + ([torch.float32] if "fp32" in wanted else [])
    decode_dtype = torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32
    vocab = get_encoding(cfg.data.encoding).n_vocab
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    batch = args.batch or cfg.data.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    details = {"shape": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "n_head": cfg.attention.n_heads,
                         "block_size": cfg.model.block_size, "batch_size": batch, "vocab": vocab},
               "torch": torch.__version__, "training": [], "decode": [], "loss": [], "errors": []}
    record = RunRecord(kind="bench", device=name, encoding=cfg.data.encoding, details=details,
                       precision="bf16-mixed" if bf16 else "32-true")
    loss_config = variant_config(cfg, cfg.attention.n_heads, vocab)
    for dtype in dtypes:
        started = time.perf_counter()
        label = "bf16" if dtype == torch.bfloat16 else "fp32"
        try:
            for r in loss_probe(loss_config, dtype, batch * cfg.model.block_size, args.loss_repeats, device):
                details["loss"].append({"dtype": str(dtype).removeprefix("torch."), **r})
                chunks = "unfused" if r["head"] == "unfused" else f"{r['chunks']} x {r['chunk_rows']} rows"
                peak = f", peak +{r['peak_bytes'] / 1e9:.2f} GB" if r["peak_bytes"] is not None else ""
                print(f"LM head + loss {label} {chunks}: {r['ms']:.1f} ms ({r['ms_min']:.1f}-{r['ms_max']:.1f}){peak}",
                      flush=True)
        except Exception as e:
            details["errors"].append(f"loss {label}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        print(f"  ({time.perf_counter() - started:.1f}s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record.save(args.out)
    for kv in (int(k) for k in args.kv.split(",")):
        config = variant_config(cfg, kv, vocab)
        for dtype in dtypes:
            label = f"{config.attention} kv={kv} {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
            started = time.perf_counter()
            try:
                row = train_probe(config, dtype, batch, args.steps, args.warmup, optim,
                                  cfg.trainer.gradient_clip_val, device)
                details["training"].append({"attention": config.attention, "kv_groups": kv,
                                            "dtype": str(dtype).removeprefix("torch."), **row})
                print(f"{label}: ran {row['ran']}, {row['tokens_per_sec']:.0f} tokens/s, {row['step_ms']:.1f} ms/step,"
                      f" accepted {[b for b, why in row['accepted'].items() if why is None]}"
                      f" ({time.perf_counter() - started:.1f}s)", flush=True)
            except Exception as e:  # one variant's failure (OOM, a kernel error) must not hide the others
                details["errors"].append(f"train {label}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # after an OOM too: the failed step's tensors are gone with its frames
            record.save(args.out)
        started = time.perf_counter()
        try:
            graphs = graphed_decode.GraphWatch(True, device)
            rows = decode_probe(config, decode_dtype, [int(b) for b in args.decode_batches.split(",")],
                                min(args.decode_new, config.block_size // 2), args.decode_repeats, device)
            for r in rows:
                details["decode"].append({"attention": config.attention, "kv_groups": kv,
                                          "dtype": str(decode_dtype).removeprefix("torch."), **r})
                print(f"decode {config.attention} kv={kv} b{r['batch']}{' graph' if r['graphs_ran'] else ''}: "
                      f"{r['tokens_per_sec']:.0f} tokens/s, "
                      f"{r['step_ms']:.2f} ms/step, {r['bytes_per_step'] / 1e6:.0f} MB/step", flush=True)
            for reason in graphs.failures():
                details["errors"].append(f"decode {config.attention} kv={kv}: CUDA graph capture failed: "
                                         f"{reason[:300]}")
            print(f"  ({time.perf_counter() - started:.1f}s)", flush=True)
        except Exception as e:
            details["errors"].append(f"decode {config.attention} kv={kv}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record.save(args.out)
    if device.type == "cuda":
        details["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    record.save(args.out)
    print(f"wrote {args.out}")
    sys.exit(1 if details["errors"] else 0)


if __name__ == "__main__":
    main()
