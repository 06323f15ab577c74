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

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import cpu_has_bf16, keep_freed_memory
from gpt_lightning.data.tokens import get_encoding
from gpt_lightning.measure.limits import matmul_peak, spec_peak
from gpt_lightning.measure.references import NaiveGPT, hf_gpt2
from gpt_lightning.measure.timing import summarize, time_decode
from gpt_lightning.measure.training_speed import TrainContender
from gpt_lightning.model import GPT, kv_cache_bytes_per_token
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


def bench(cfg: DictConfig) -> RunRecord:
    check_config(cfg)  # the model/data/trainer keys, as train checks them
    check_bench(cfg.bench)
    b = cfg.bench
    keep_freed_memory()
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

    def ours(compile_=False):
        torch.manual_seed(cfg.seed)
        model = GPT(config).to(device)
        if compile_:
            model.compile()
        return model, make_optimizer(model, optim, fused=fused)

    clip = cfg.trainer.gradient_clip_val
    contenders = []
    m, o = ours()
    contenders.append(TrainContender("ours fp32", m, o, x, y, clip=clip))
    if bf16:
        m, o = ours()
        contenders.append(TrainContender("ours bf16-mixed", m, o, x, y, autocast_dtype=torch.bfloat16, clip=clip))
    if b.compile:
        m, o = ours(compile_=True)
        contenders.append(TrainContender(f"ours {'bf16-mixed' if bf16 else 'fp32'} compiled", m, o, x, y,
                                         autocast_dtype=torch.bfloat16 if bf16 else None, clip=clip))
    if b.hf:
        hf = hf_gpt2(config, device)
        contenders.append(TrainContender("HF GPT2LMHeadModel fp32 (sdpa)", hf,
                                         torch.optim.AdamW(hf.parameters(), lr=optim["lr"]), x, y, hf=True))
    if b.naive:
        naive = NaiveGPT(config).to(device)
        contenders.append(TrainContender("naive reference fp32", naive,
                                         torch.optim.AdamW(naive.parameters(), lr=optim["lr"]), x, y))

    for c in contenders:  # warm-up: kernels, allocator, compile
        c.run(b.warmup_steps)
    train: dict[str, list[float]] = {c.name: [] for c in contenders}
    lightning_rates: list[float] = []
    precision = "bf16-mixed" if bf16 else "32-true"
    for r in range(b.repeats):
        for c in contenders:
            train[c.name].append(c.run(b.steps))
        if b.lightning:
            lightning_rates.append(lightning_tokens_per_sec(cfg, b.steps, b.warmup_steps, precision))
        print(f"round {r + 1}/{b.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in train.items()), flush=True)
    if b.lightning:
        train[f"Lightning Trainer + DataModule ({precision})"] = lightning_rates

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
    if b.hf:
        decoders["HF generate fp32"] = (hf.eval(), True)
    decode: dict[str, list[float]] = {}
    for bs in b.decode_batch_sizes:
        prompt = prompt1.expand(bs, -1).contiguous()
        for name, (model, is_hf) in decoders.items():
            time_decode(model, prompt, 8, is_hf)  # warm-up
        for _ in range(b.repeats):
            for name, (model, is_hf) in decoders.items():
                decode.setdefault(f"{name} b{bs}", []).append(time_decode(model, prompt, new_tokens, is_hf))

    # peaks and MFU
    flops_per_token = contenders[0].model.flops_per_token(T)
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if bf16:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    spec = {k: spec_peak(device, d) for k, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    training = {}
    for name, rates in train.items():
        s = summarize(rates)
        key = "bf16" if "bf16" in name else "fp32"
        s["mfu_measured_peak"] = s["median"] * flops_per_token / peaks[key] if key in peaks else None
        s["mfu_spec_peak"] = s["median"] * flops_per_token / spec[key] if spec.get(key) else None
        training[name] = s
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "shape": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "kv_groups": config.n_kv_groups, "block_size": T, "batch_size": B,
                  "vocab": config.padded_vocab_size, "attention": config.attention},
        "flops_per_token": flops_per_token,
        "matmul_peak_flops": peaks, "spec_peak_flops": spec,
        "training_tokens_per_sec": training,
        "decode_tokens_per_sec": {k: summarize(v) for k, v in decode.items()},
        "kv_cache_bytes_per_token": {
            "configured": kv_cache_bytes_per_token(config.n_layer, config.n_kv_groups, config.head_dim),
            "mha": kv_cache_bytes_per_token(config.n_layer, config.n_head, config.head_dim)},
        "decode_prompt_tokens": prompt_len, "decode_new_tokens": new_tokens,
        "repeats": b.repeats, "steps": b.steps,
    }
    result["ratios"] = ratios(result)
    best = "ours bf16-mixed" if "ours bf16-mixed" in training else "ours fp32"
    return RunRecord.for_model(
        "bench", contenders[0].model, encoding=cfg.data.encoding,
        train_tokens_per_sec=training[best]["median"], train_mfu=training[best]["mfu_measured_peak"],
        decode_tokens_per_sec=result["decode_tokens_per_sec"].get("ours fp32 b1", {}).get("median"),
        precision="bf16-mixed" if best.endswith("bf16-mixed") else "32-true", device=result["device"],
        details=result)


def ratios(r: dict) -> dict:
    t = {k: v["median"] for k, v in r["training_tokens_per_sec"].items()}
    d = {k: v["median"] for k, v in r["decode_tokens_per_sec"].items()}
    hf = next((v for k, v in t.items() if k.startswith("HF")), None)
    out = {}
    if hf:
        out["train: ours fp32 / HF fp32"] = t["ours fp32"] / hf
        if "ours bf16-mixed" in t:
            out["train: ours bf16-mixed / HF fp32"] = t["ours bf16-mixed"] / hf
    lightning = next((v for k, v in t.items() if k.startswith("Lightning")), None)
    if lightning:
        bare = t.get("ours bf16-mixed") if "bf16" in next(k for k in t if k.startswith("Lightning")) else t["ours fp32"]
        out["train: Lightning / bare loop (same precision)"] = lightning / bare
    for key in d:
        if key.startswith("HF generate"):
            bs = key.rsplit(" ", 1)[1]
            out[f"decode {bs}: ours fp32 / HF fp32"] = d[f"ours fp32 {bs}"] / d[key]
            if f"ours bf16 weights {bs}" in d:
                out[f"decode {bs}: ours bf16 / HF fp32"] = d[f"ours bf16 weights {bs}"] / d[key]
    kv = r["kv_cache_bytes_per_token"]
    out["KV cache: configured / MHA"] = kv["configured"] / kv["mha"]
    return out


def format_table(r: dict) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}, shape: {r['shape']}",
             "matmul peak (measured): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in r["matmul_peak_flops"].items()),
             "", f"{'training (tokens/s)':<48} {'median':>9} {'min-max':>15} {'MFU':>6}"]
    for name, s in r["training_tokens_per_sec"].items():
        mfu = f"{s['mfu_measured_peak']:.0%}" if s.get("mfu_measured_peak") else "-"
        lines.append(f"{name:<48} {s['median']:>9.0f} {s['min']:>7.0f}-{s['max']:<7.0f} {mfu:>6}")
    lines += ["", f"{'decode (new tokens/s, KV cache, greedy)':<48} {'median':>9} {'min-max':>15}"]
    for name, s in r["decode_tokens_per_sec"].items():
        lines.append(f"{name:<48} {s['median']:>9.1f} {s['min']:>7.1f}-{s['max']:<7.1f}")
    kv = r["kv_cache_bytes_per_token"]
    lines += ["", f"KV-cache bytes per token (fp32): configured {kv['configured']:,}, MHA {kv['mha']:,}", "", "ratios:"]
    lines += [f"  {k:<46} {v:.2f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with exits_on_user_error():
        record = bench(cfg)
    print(format_table(record.details))
    out = record.save(Path(cfg.bench.json))
    print(f"\nwrote {out.resolve()}")


if __name__ == "__main__":
    main()
