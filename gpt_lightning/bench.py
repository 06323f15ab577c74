"""`python -m gpt_lightning.bench [overrides]`: our GPT against Hugging Face GPT-2 and a naive reference, one process.

Same shape for every contender (the usual `model.*`, `attention.*`, `data.batch_size` keys). Candidates are timed
in interleaved rounds so drift (thermal, other load) hits all of them alike; each figure is the median with the
min–max over rounds. Prints a table and writes the run record (`bench.json`, kind "bench", the tables under `details`).

Contenders:
- training tokens/s (forward, loss, backward, AdamW step): ours in each precision the device runs (fp32; bf16
  autocast where the CPU/GPU has native bf16; torch.compile with bench.compile=true), HF `GPT2LMHeadModel` (sdpa,
  fp32, its own AdamW), and `NaiveGPT` (measure/references.py: how the original project computed attention);
- with bench.lightning=true, the same model through the Lightning Trainer and the real DataModule;
- decode tokens/s with the KV cache at each `bench.decode_batch_sizes` (ours fp32 and bf16 weights, HF `generate`);
- KV-cache bytes per token for the configured attention against MHA;
- MFU against the measured dense-matmul peak of this device (and the spec peak on a known GPU).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import cpu_has_bf16, keep_freed_memory
from gpt_lightning.data.tokens import get_encoding
from gpt_lightning.common.errors import UserError
from gpt_lightning.measure import decode_grid as grid
from gpt_lightning.measure.decode_linears import format_linears, measure_decode_linears
from gpt_lightning.measure.limits import (bandwidth_probe, bracketed, matmul_peak, matmul_peaks, read_bandwidth,
                                         spec_peak)
from gpt_lightning.measure.profile import format_breakdown, step_breakdown
from gpt_lightning.measure.references import NaiveGPT, UnfusedHeadGPT, hf_gpt2
from gpt_lightning.measure.step_memory import measure_in_subprocess
from gpt_lightning.measure.timing import summarize, time_decode
from gpt_lightning.measure.training_speed import TrainContender
from gpt_lightning.model import GPT, GPTConfig, kv_cache_bytes_per_token
from gpt_lightning.model import graphed_decode
from gpt_lightning.model.optim import make_optimizer
from gpt_lightning.training.config_checks import check_bench, check_config
from gpt_lightning.training.config_errors import one_line_config_errors
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.run_record import RunRecord


def lightning_tokens_per_sec(cfg: DictConfig, steps: int, warmup: int, precision: str) -> float:
    """Tokens/s of steps warmup..warmup+steps through Trainer.fit with the real DataModule (no validation)."""
    import lightning as L
    from hydra.utils import instantiate

    from gpt_lightning.training.module import GPTLightningModule

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.tokens, self.start = 0, time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > warmup:
                self.tokens += batch[0].numel()
            if trainer.global_step == warmup + steps:
                self.elapsed = time.perf_counter() - self.start

    dm = instantiate(cfg.data, _convert_="all")
    module = GPTLightningModule.from_config(gpt_config_from_cfg(cfg, dm.vocab_size),
                                            OmegaConf.to_container(cfg.optim, resolve=True))
    clock = Clock()
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=precision,
                        max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                        gradient_clip_val=cfg.trainer.gradient_clip_val, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return clock.tokens / clock.elapsed


def check_bench_grid(cfg: DictConfig) -> None:
    """Refuse bad decode-grid and budget settings before anything is built or timed (the common bench.* ranges are
    config_checks.check_bench's)."""
    b = cfg.bench
    if b.threads is not None and (not isinstance(b.threads, int) or b.threads < 1):
        raise UserError(f"bench.threads={b.threads} must be a positive integer, or null for torch's default")
    if int(b.grid_new_tokens) < 1:
        raise UserError(f"bench.grid_new_tokens={b.grid_new_tokens} must be >= 1")
    for key in ("grid_batch_sizes", "grid_contexts"):
        if not b[key] or min(b[key]) < 1:
            raise UserError(f"bench.{key}={list(b[key]) if b[key] else b[key]} must be a non-empty list of "
                            f"positive integers")
    if b.kv_groups is not None:
        groups = [b.kv_groups] if isinstance(b.kv_groups, int) else list(b.kv_groups)
        bad = [g for g in groups if not isinstance(g, int) or g < 1 or cfg.attention.n_heads % g]
        if bad or not groups:
            raise UserError(f"bench.kv_groups={groups}: each must divide attention.n_heads={cfg.attention.n_heads} "
                            f"(e.g. bench.kv_groups=[1,2,4,8] at 8 heads)")
    if b.memory_budget_gb <= 0:
        raise UserError(f"bench.memory_budget_gb={b.memory_budget_gb} must be > 0")
    if b.decode_grid and b.grid_new_tokens >= cfg.model.block_size:
        raise UserError(f"bench.grid_new_tokens={b.grid_new_tokens} leaves no context in "
                        f"model.block_size={cfg.model.block_size}; use fewer new tokens")


def prepare_output(path: Path) -> None:
    """Create bench.json's folder before anything is timed: a missing or unusable folder found only at the end
    threw away minutes of measurements."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"bench.json={path}: cannot create its folder ({e.strerror}); pass a writable path") from None
    if path.is_dir():
        raise UserError(f"bench.json={path} is a folder; pass a file path, e.g. bench.json={path / 'bench.json'}")


def sdpa_paths(model) -> str:
    """The SDPA path(s) its attention layers took in training (see `CausalSelfAttention.sdpa_path`)."""
    return ", ".join(sorted({blk.attn.sdpa_path for blk in model.transformer.h if blk.attn.sdpa_path})) or "-"


def bench(cfg: DictConfig) -> RunRecord:
    check_config(cfg)  # the model/data/trainer keys, as train checks them
    check_bench(cfg.bench)
    check_bench_grid(cfg)
    prepare_output(Path(cfg.bench.json))
    b = cfg.bench
    keep_freed_memory()
    if b.threads:  # e.g. 1 on a shared machine: a lone thread keeps its pace when others take the other cores
        torch.set_num_threads(b.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
                          else "cpu")
    config = gpt_config_from_cfg(cfg, get_encoding(cfg.data.encoding).n_vocab)
    B, T = cfg.data.batch_size, config.block_size
    x = torch.randint(0, config.vocab_size, (B, T), device=device)
    y = torch.roll(x, -1, dims=1)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() or device.type == "cpu" and cpu_has_bf16()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    fused = device.type in ("cuda", "cpu")

    def ours(compile_=False, cls=GPT):
        torch.manual_seed(cfg.seed)
        model = cls(config).to(device)
        if compile_:
            model.compile()
        return model, make_optimizer(model, optim, fused=fused)

    clip = cfg.trainer.gradient_clip_val
    contenders, memory_specs = [], {}  # memory_specs: contender -> what step_memory builds in a fresh process
    spec = dict(config=vars(config), batch_size=B, optim=optim, device=str(device), clip=clip, steps=3)
    m, o = ours()
    contenders.append(TrainContender("ours fp32", m, o, x, y, clip=clip))
    memory_specs["ours fp32"] = dict(spec, kind="ours")
    if bf16:
        m, o = ours()
        contenders.append(TrainContender("ours bf16-mixed", m, o, x, y, autocast_dtype=torch.bfloat16, clip=clip))
        memory_specs["ours bf16-mixed"] = dict(spec, kind="ours", autocast="bf16")
    if b.unfused_head and b.train:
        m, o = ours(cls=UnfusedHeadGPT)
        contenders.append(TrainContender("ours fp32, unfused LM head (before)", m, o, x, y, clip=clip))
        memory_specs["ours fp32, unfused LM head (before)"] = dict(spec, kind="ours_unfused")
        if bf16:
            m, o = ours(cls=UnfusedHeadGPT)
            contenders.append(TrainContender("ours bf16-mixed, unfused LM head (before)", m, o, x, y,
                                             autocast_dtype=torch.bfloat16, clip=clip))
            memory_specs["ours bf16-mixed, unfused LM head (before)"] = dict(spec, kind="ours_unfused",
                                                                              autocast="bf16")
    if b.compile and b.train:
        m, o = ours(compile_=True)
        contenders.append(TrainContender(f"ours {'bf16-mixed' if bf16 else 'fp32'} compiled", m, o, x, y,
                                         autocast_dtype=torch.bfloat16 if bf16 else None, clip=clip))
    if b.hf and b.train:
        hf = hf_gpt2(config, device)
        contenders.append(TrainContender("HF GPT2LMHeadModel fp32 (sdpa)", hf,
                                         torch.optim.AdamW(hf.parameters(), lr=optim["lr"]), x, y, hf=True))
        memory_specs["HF GPT2LMHeadModel fp32 (sdpa)"] = dict(spec, kind="hf")
    if b.naive and b.train:
        naive = NaiveGPT(config).to(device)
        contenders.append(TrainContender("naive reference fp32", naive,
                                         torch.optim.AdamW(naive.parameters(), lr=optim["lr"]), x, y))
        memory_specs["naive reference fp32"] = dict(spec, kind="naive")
    if bf16 and not b.train:
        contenders = contenders[:1]  # bench.train=false: ours fp32 stays, its weights feed the decode figures

    for c in contenders:  # warm-up: kernels, allocator, compile; attention picks its SDPA path here
        c.run(b.warmup_steps)
    sdpa = {c.name: sdpa_paths(c.model) for c in contenders if isinstance(c.model, GPT)}
    train: dict[str, list[float]] = {c.name: [] for c in contenders}
    lightning_rates: list[float] = []
    precision = "bf16-mixed" if bf16 else "32-true"
    peak_dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if bf16 else {})
    # The matmul peaks, each kernel's, at every round's start and end: a round's MFU is against the mean of the two
    # best-kernel peaks (the VM drifts)

    def kernel_peaks() -> dict[str, dict[str, float]]:  # {"fp32": {"aten": ..., "onednn": ...}, ...}
        return {k: matmul_peaks(device, d) for k, d in peak_dtypes.items()}

    round_kernels = [kernel_peaks()] if b.train else []
    for r in range(b.repeats if b.train else 0):
        for c in contenders:
            train[c.name].append(c.run(b.steps))
        if b.lightning:
            lightning_rates.append(lightning_tokens_per_sec(cfg, b.steps, b.warmup_steps, precision))
        round_kernels.append(kernel_peaks())
        print(f"round {r + 1}/{b.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in train.items()), flush=True)
    if b.lightning:
        train[f"Lightning Trainer + DataModule ({precision})"] = lightning_rates
    train = {k: v for k, v in train.items() if v}

    breakdown = {}
    if b.profile and b.train:
        for c in contenders:
            if c.name in ("ours fp32", "ours bf16-mixed"):
                breakdown[c.name] = step_breakdown(c, steps=2)
    memory = {}
    if b.peak_memory and b.train:
        if device.type == "cuda":  # the fresh processes share the card: return what our caching allocator holds
            torch.cuda.empty_cache()
        runs: dict[str, list[dict]] = {name: [] for name in memory_specs}
        for r in range(b.memory_repeats):  # interleaved, like the timed rounds: drift hits every contender alike
            for name, s in memory_specs.items():
                print(f"peak memory {r + 1}/{b.memory_repeats}: {name} (fresh process) ...", flush=True)
                runs[name].append(measure_in_subprocess(s))
        memory = {name: summarize_memory(rs) for name, rs in runs.items()}

    # decode
    for c in contenders:
        c.model.eval()
    prompt_len = min(b.decode_prompt_tokens, T - 1)
    new_tokens = min(b.decode_new_tokens, T - prompt_len)  # inside the context: decode, not re-prefill, is timed
    prompt1 = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    decoders = {"ours fp32": (contenders[0].model, False)}
    if bf16 or b.decode_bf16:
        decoders["ours bf16 weights"] = (GPT(config).to(device).to(torch.bfloat16).eval(), False)
        decoders["ours bf16 weights"][0].load_state_dict(contenders[0].model.state_dict())
    if b.hf and b.train:
        decoders["HF generate fp32"] = (hf.eval(), True)
    decode: dict[str, list[float]] = {}
    steps_b1: dict[str, list[tuple[float, float]]] = {}  # batch-1 decode steps alone: (tokens/s, bandwidth beside)
    graphs = graphed_decode.GraphWatch(b.cuda_graph, device)
    # On a GPU with graphs on, the batch-1 steps are also timed eager, beside: the graph's gain in the same rounds.
    step_modes = {"": b.cuda_graph} | ({" eager": False} if graphs.asked else {})
    step_models = {}
    for bs in b.decode_batch_sizes:
        prompt = prompt1.expand(bs, -1).contiguous()
        for name, (model, is_hf) in decoders.items():
            time_decode(model, prompt, new_tokens, is_hf, b.cuda_graph)  # warm-up: the graphs of every key bucket
        for _ in range(b.repeats):
            for name, (model, is_hf) in decoders.items():
                decode.setdefault(f"{name} b{bs}", []).append(time_decode(model, prompt, new_tokens, is_hf,
                                                                          b.cuda_graph))
                if bs == 1 and not is_hf:
                    for suffix, graph in step_modes.items():
                        g = torch.Generator().manual_seed(cfg.seed)
                        step_models[name + suffix] = model
                        steps_b1.setdefault(name + suffix, []).append(bracketed(
                            lambda: grid.time_decode_at(model, 1, prompt_len, new_tokens, g, cuda_graph=graph),
                            bandwidth_probe(device)))

    # decode's linears alone at each decode batch size, against the limits measured beside every round
    linears = []
    if b.decode_linears:
        linears = measure_decode_linears({name: model for name, (model, is_hf) in decoders.items() if not is_hf},
                                         list(b.grid_batch_sizes), b.repeats, lambda dtype: matmul_peak(device, dtype),
                                         bandwidth_probe(device))

    # peaks, bandwidth, MFU
    flops_per_token = contenders[0].model.flops_per_token(T)
    round_kernels = round_kernels or [kernel_peaks()]
    round_peaks = [{k: max(p[k].values()) for k in peak_dtypes} for p in round_kernels]  # the best kernel's
    peaks = {k: statistics.median(p[k] for p in round_peaks) for k in peak_dtypes}
    by_kernel = {k: {name: statistics.median(p[k][name] for p in round_kernels) for name in round_kernels[0][k]}
                 for k in peak_dtypes}  # which kernel sets the peak
    bandwidth = read_bandwidth(device)
    spec_peaks = {k: spec_peak(device, d) for k, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    training = {}
    for name, rates in train.items():
        s = summarize(rates)
        key = "bf16" if "bf16" in name else "fp32"
        mfu = per_round_mfu(rates, round_peaks, key, flops_per_token)
        s["mfu_measured_peak"], s["mfu_min"], s["mfu_max"] = mfu["median"], mfu["min"], mfu["max"]
        s["mfu_spec_peak"] = s["median"] * flops_per_token / spec_peaks[key] if spec_peaks.get(key) else None
        training[name] = s
    read_limit = {}
    for name, rounds in steps_b1.items():
        model = step_models[name]
        per_step = grid.bytes_read_per_step(model, 1, prompt_len + new_tokens // 2)
        s = summarize([rate for rate, _ in rounds])
        bws = summarize([bw for _, bw in rounds])
        fraction = summarize([rate * per_step / bw for rate, bw in rounds])  # each round against its own bandwidth
        read_limit[name] = {"tokens_per_sec": s, "bytes_read_per_step": per_step,
                            "weight_bytes": grid.decode_weight_bytes(model),
                            "read_bandwidth_bytes_per_sec": bws,
                            "read_limit_tokens_per_sec": bws["median"] / per_step,
                            "fraction_of_read_limit": fraction["median"],
                            "fraction_of_read_limit_min": fraction["min"],
                            "fraction_of_read_limit_max": fraction["max"]}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "shape": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "kv_groups": config.n_kv_groups, "block_size": T, "batch_size": B,
                  "vocab": config.padded_vocab_size, "attention": config.attention},
        "flops_per_token": flops_per_token,
        "matmul_peak_flops": peaks, "matmul_peak_flops_rounds": round_peaks, "matmul_peak_flops_by_kernel": by_kernel,
        "spec_peak_flops": spec_peaks,
        "read_bandwidth_bytes_per_sec": bandwidth,
        "sdpa_path": sdpa,
        "training_tokens_per_sec": training,
        "peak_memory": memory,
        "step_breakdown": breakdown,
        "decode_tokens_per_sec": {k: summarize(v) for k, v in decode.items()},
        "decode_read_limit_b1": read_limit,
        "decode_cuda_graph": graphs.ran(),  # asked for on a GPU, and none of the decode timings' captures failed
        "decode_linears": linears,
        "kv_cache_bytes_per_token": {
            "configured": kv_cache_bytes_per_token(config.n_layer, config.n_kv_groups, config.head_dim),
            "mha": kv_cache_bytes_per_token(config.n_layer, config.n_head, config.head_dim)},
        "decode_prompt_tokens": prompt_len, "decode_new_tokens": new_tokens,
        "repeats": b.repeats, "steps": b.steps,
    }
    if b.decode_grid:
        result.update(run_decode_grid(cfg, config, device, contenders[0].model))
    result["ratios"] = ratios(result)
    best = "ours bf16-mixed" if "ours bf16-mixed" in training else "ours fp32"
    mem = memory.get(best, {})
    return RunRecord.for_model(
        "bench", contenders[0].model, encoding=cfg.data.encoding,
        train_tokens_per_sec=training.get(best, {}).get("median"),
        train_mfu=training.get(best, {}).get("mfu_measured_peak"),
        decode_tokens_per_sec=result["decode_tokens_per_sec"].get("ours fp32 b1", {}).get("median"),
        peak_memory_bytes=mem.get("peak_bytes"), peak_memory_kind=mem.get("kind"),
        precision="bf16-mixed" if best.endswith("bf16-mixed") else "32-true", device=result["device"],
        details=result)


def per_round_mfu(rates: list[float], round_peaks: list[dict], key: str, flops_per_token: float) -> dict:
    """MFU of each round (tokens/s `rates[i]`) against the mean of the `key` peaks measured at its start and end
    (`round_peaks[i]`, `round_peaks[i + 1]`); median with min-max."""
    if len(round_peaks) != len(rates) + 1:
        raise ValueError(f"{len(rates)} rounds need {len(rates) + 1} peak measurements, got {len(round_peaks)}")
    return summarize([rate * flops_per_token / ((start[key] + end[key]) / 2)
                      for rate, start, end in zip(rates, round_peaks, round_peaks[1:])])


def summarize_memory(runs: list[dict]) -> dict:
    """Fresh-process peaks of one contender -> medians (`peak_bytes`, `step_bytes`), their min and max, the runs.

    A process's peak RSS moves by +-10% between identical runs (where glibc's heap happens to fragment), so one
    run per contender can flip a ratio; the ratios use the medians, with the range of each beside them."""
    out = {"kind": runs[0]["kind"], "runs": runs}
    for key in ("peak_bytes", "step_bytes", "baseline_bytes"):
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[key.replace("_bytes", "_min_bytes")], out[key.replace("_bytes", "_max_bytes")] = min(values), max(values)
    return out


def run_decode_grid(cfg: DictConfig, config: GPTConfig, device, configured: GPT) -> dict:
    """The decode grid over bench.grid_batch_sizes x bench.grid_contexts for each of bench.kv_groups (fp32)."""
    b = cfg.bench
    groups = [config.n_kv_groups] if b.kv_groups is None else (
        [b.kv_groups] if isinstance(b.kv_groups, int) else list(b.kv_groups))
    models = []
    for g in sorted(set(groups), reverse=True):
        if g == config.n_kv_groups:
            models.append(configured)
        else:
            torch.manual_seed(cfg.seed)
            models.append(GPT(GPTConfig(**{**vars(config), "n_kv_groups": g})).to(device))
    dtype = models[0].lm_head.weight.dtype
    rows = grid.decode_grid(models, list(b.grid_batch_sizes), list(b.grid_contexts), b.grid_new_tokens,
                            b.repeats, bandwidth=bandwidth_probe(device), seed=cfg.seed,
                            peak=lambda: matmul_peak(device, dtype), cuda_graph=b.cuda_graph)
    contexts = sorted({r["context"] for r in rows})
    budget = grid.budget_rows(models, contexts, b.memory_budget_gb)
    big_b, big_l = max(b.grid_batch_sizes), max(contexts)
    ratio = grid.mqa_over_mha(rows, 32 if 32 in b.grid_batch_sizes else big_b, big_l)
    return {"decode_grid": rows, "decode_grid_budget": budget, "decode_grid_mqa_over_mha": ratio}


def ratios(r: dict) -> dict:
    t = {k: v["median"] for k, v in r["training_tokens_per_sec"].items()}
    d = {k: v["median"] for k, v in r["decode_tokens_per_sec"].items()}
    hf = next((v for k, v in t.items() if k.startswith("HF")), None)
    out = {}
    if hf:
        out["train: ours fp32 / HF fp32"] = t["ours fp32"] / hf
        if "ours bf16-mixed" in t:
            out["train: ours bf16-mixed / HF fp32"] = t["ours bf16-mixed"] / hf
    for p in ("fp32", "bf16-mixed"):
        before = t.get(f"ours {p}, unfused LM head (before)")
        if before and f"ours {p}" in t:
            out[f"train: ours {p} / unfused LM head (before)"] = t[f"ours {p}"] / before
    lightning = next((v for k, v in t.items() if k.startswith("Lightning")), None)
    if lightning:
        bare = t.get("ours bf16-mixed") if "bf16" in next(k for k in t if k.startswith("Lightning")) else t["ours fp32"]
        out["train: Lightning / bare loop (same precision)"] = lightning / bare
    mem = r.get("peak_memory", {})
    hf_mem = next((v for k, v in mem.items() if k.startswith("HF")), None)
    for name in ("ours fp32", "ours bf16-mixed"):
        if hf_mem and name in mem:
            out[f"peak memory: {name} / HF fp32 (process peak)"] = mem[name]["peak_bytes"] / hf_mem["peak_bytes"]
            out[f"peak memory: {name} / HF fp32 (step, above baseline)"] = (
                mem[name]["step_bytes"] / hf_mem["step_bytes"])
            if "step_max_bytes" in mem[name] and "step_min_bytes" in hf_mem:  # worst pairing of the runs
                out[f"peak memory: {name} / HF fp32 (step, highest of ours / lowest of HF)"] = (
                    mem[name]["step_max_bytes"] / hf_mem["step_min_bytes"])
    for key in d:
        if key.startswith("HF generate"):
            bs = key.rsplit(" ", 1)[1]
            out[f"decode {bs}: ours fp32 / HF fp32"] = d[f"ours fp32 {bs}"] / d[key]
            if f"ours bf16 weights {bs}" in d:
                out[f"decode {bs}: ours bf16 / HF fp32"] = d[f"ours bf16 weights {bs}"] / d[key]
    for name, lim in r.get("decode_read_limit_b1", {}).items():
        out[f"decode b1 steps: {name} / read limit"] = lim["fraction_of_read_limit"]
    for row in r.get("decode_linears", []):
        out[f"decode linears b{row['rows']}: {row['name']} / roofline"] = row["fraction_of_roofline"]["median"]
    kv = r["kv_cache_bytes_per_token"]
    out["KV cache: configured / MHA"] = kv["configured"] / kv["mha"]
    q = r.get("decode_grid_mqa_over_mha")
    if q:
        out[f"decode grid b{q['batch']} ctx{q['context']}: MQA / MHA achieved"] = q["achieved"]
        out[f"decode grid b{q['batch']} ctx{q['context']}: MQA / MHA bytes-read bound"] = q["bound"]
        if "roofline_ratio" in q:
            out[f"decode grid b{q['batch']} ctx{q['context']}: MQA / MHA roofline ratio"] = q["roofline_ratio"]
    return out


def kernels(by_kernel: dict | None) -> str:
    """' (aten 213, onednn 486)': each kernel's own peak, where more than one was timed."""
    if not by_kernel or len(by_kernel) < 2:
        return ""
    return " (" + ", ".join(f"{name} {flops / 1e9:.0f}" for name, flops in by_kernel.items()) + ")"


def format_table(r: dict) -> str:
    mem = r.get("peak_memory", {})
    lines = [f"device: {r['device']}, torch {r['torch']}, shape: {r['shape']}",
             "matmul peak (measured, median over the rounds, the best kernel's): "
             + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" + kernels(r.get("matmul_peak_flops_by_kernel", {}).get(k))
                         for k, v in r["matmul_peak_flops"].items())
             + f"; memory-read bandwidth (measured): {r['read_bandwidth_bytes_per_sec'] / 1e9:.1f} GB/s",
             "(MFU and % of the read limit: each round against the limit measured beside it; median, min-max)",
             "SDPA path in training: " + "; ".join(f"{k}: {v}" for k, v in r["sdpa_path"].items())]
    if r.get("decode_cuda_graph"):
        lines.append("decode steps of ours: replayed from CUDA graphs (the '... eager' b1 rows: the same steps "
                     "launched kernel by kernel; HF's are eager)")
    if r["training_tokens_per_sec"]:
        lines += ["", f"{'training (tokens/s)':<48} {'median':>9} {'min-max':>15} {'MFU':>6} {'MFU min-max':>11} "
                      f"{'peak MB':>8} {'step MB':>8} {'step min-max':>12}"]
        for name, s in r["training_tokens_per_sec"].items():
            mfu = f"{s['mfu_measured_peak']:.0%}" if s.get("mfu_measured_peak") else "-"
            mfu_range = f"{s['mfu_min']:.0%}-{s['mfu_max']:.0%}" if "mfu_min" in s else "-"
            m = mem.get(name)
            pk, st = (f"{m['peak_bytes'] / 1e6:.0f}", f"{m['step_bytes'] / 1e6:.0f}") if m else ("-", "-")
            spread = (f"{m['step_min_bytes'] / 1e6:.0f}-{m['step_max_bytes'] / 1e6:.0f}"
                      if m and "step_min_bytes" in m else "-")
            lines.append(f"{name:<48} {s['median']:>9.0f} {s['min']:>7.0f}-{s['max']:<7.0f} {mfu:>6} {mfu_range:>11} "
                         f"{pk:>8} {st:>8} {spread:>12}")
        if mem:
            first = next(iter(mem.values()))
            lines.append(f"(peak MB: {first['kind']} of a fresh process running 3 training steps of that contender, "
                         f"median of {len(first.get('runs', [first]))} processes; step MB: the part above the process "
                         f"before the model was built)")
    for name, b in r.get("step_breakdown", {}).items():
        lines += ["", format_breakdown(f"step breakdown, {name}", b)]
    lines += ["", f"{'decode (new tokens/s, KV cache, greedy)':<48} {'median':>9} {'min-max':>15}"]
    for name, s in r["decode_tokens_per_sec"].items():
        lines.append(f"{name:<48} {s['median']:>9.1f} {s['min']:>7.1f}-{s['max']:<7.1f}")
    for name, lim in r.get("decode_read_limit_b1", {}).items():
        s = lim["tokens_per_sec"]
        lines.append(f"{name + ' b1, decode steps only':<48} {s['median']:>9.1f} {s['min']:>7.1f}-{s['max']:<7.1f}"
                     f"  = {lim['fraction_of_read_limit']:.0%} of the read limit (median of the rounds' own: "
                     f"{lim['fraction_of_read_limit_min']:.0%}-{lim['fraction_of_read_limit_max']:.0%}; "
                     f"{lim['bytes_read_per_step'] / 1e6:.1f} MB per token, bandwidth beside the rounds "
                     f"{lim['read_bandwidth_bytes_per_sec']['median'] / 1e9:.1f} GB/s "
                     f"({lim['read_bandwidth_bytes_per_sec']['min'] / 1e9:.1f}-"
                     f"{lim['read_bandwidth_bytes_per_sec']['max'] / 1e9:.1f}): {lim['read_limit_tokens_per_sec']:.0f}/s)")
    if r.get("decode_linears"):
        lines += ["", format_linears(r["decode_linears"])]
    kv = r["kv_cache_bytes_per_token"]
    lines += ["", f"KV-cache bytes per token (fp32): configured {kv['configured']:,}, MHA {kv['mha']:,}"]
    if r.get("decode_grid"):
        lines += ["", grid.format_grid(r["decode_grid"], r["decode_grid_budget"], r["decode_grid_mqa_over_mha"])]
    lines += ["", "ratios:"]
    lines += [f"  {k:<56} {v:.2f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with exits_on_user_error():
        record = bench(cfg)
    out = record.save(Path(cfg.bench.json))  # first: a failure formatting the table must not lose the minutes measured
    print(format_table(record.details))
    print(f"\nwrote {out.resolve()}")
    if cfg.bench.plots and record.details.get("decode_grid"):
        for path in grid.plot_grid(record.details["decode_grid"], record.details["decode_grid_budget"], out.parent):
            print(f"wrote {path.resolve()}")


if __name__ == "__main__":
    main()
