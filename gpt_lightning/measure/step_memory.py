"""Peak memory of one training step of one bench contender, measured in a fresh process.

`python -m gpt_lightning.measure.step_memory '<json spec>'` builds the contender, runs `steps` training steps
(forward, loss, backward, optimizer step; the first allocates the optimizer state) and prints one JSON line:
the process's peak RSS (CUDA: peak allocation), the RSS before the model was built (imports, inputs), and
their difference, the step's own memory. A fresh process per contender, because a process's peak RSS never goes
down: measured in the bench's own process, every contender after the largest would read the largest's peak.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import torch


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork and
    exec, so a child of a large process (the bench) would report its parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure(spec: dict) -> dict:
    from gpt_lightning.common.device import keep_freed_memory
    from gpt_lightning.measure.references import NaiveGPT, UnfusedHeadGPT, hf_gpt2
    from gpt_lightning.measure.training_speed import TrainContender
    from gpt_lightning.model import GPT, GPTConfig
    from gpt_lightning.model.optim import make_optimizer

    keep_freed_memory()  # the bench's allocator setting, so the heap behaves as in the bench
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    config = GPTConfig(**spec["config"])
    x = torch.randint(0, config.vocab_size, (spec["batch_size"], config.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    kind = spec["kind"]
    # Library code is loaded before the baseline, like torch itself: it is not the step's memory. Building an
    # optimizer imports torch._dynamo (~830 modules, ~75 MB of RSS here), GPT2LMHeadModel ~730 more (~60 MB).
    importlib.import_module("torch._dynamo")  # (an `import torch._dynamo` here would make torch a local name)
    if kind == "hf":
        from transformers import GPT2LMHeadModel  # noqa: F401
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if kind in ("ours", "ours_unfused"):
        model = (GPT if kind == "ours" else UnfusedHeadGPT)(config).to(device)
        opt = make_optimizer(model, spec["optim"], fused=True)
    elif kind == "hf":
        model = hf_gpt2(config, device)
        opt = torch.optim.AdamW(model.parameters(), lr=spec["optim"]["lr"])
    elif kind == "naive":
        model = NaiveGPT(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=spec["optim"]["lr"])
    else:
        raise ValueError(f"unknown contender kind {kind!r}")
    dtype = torch.bfloat16 if spec.get("autocast") == "bf16" else None
    TrainContender(kind, model, opt, x, y, autocast_dtype=dtype, hf=kind == "hf", clip=spec.get("clip")).run(
        spec.get("steps", 2))
    if device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, what = peak_rss(), "process peak RSS (VmHWM)"
    return {"peak_bytes": peak, "baseline_bytes": baseline, "step_bytes": peak - baseline, "kind": what}


def measure_in_subprocess(spec: dict, timeout: float = 900) -> dict:
    """Run `measure(spec)` in a fresh interpreter (same PYTHONPATH) and return its JSON answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", "")] + sys.path if p)}
    out = subprocess.run([sys.executable, "-m", "gpt_lightning.measure.step_memory", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        raise RuntimeError(f"step_memory for {spec['kind']} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
