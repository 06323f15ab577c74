"""Refuse a shape that cannot fit before it starts: a lower bound on one training step's memory against what is free.

`model.block_size=100000` at batch 16 asks for hundreds of GB of logits; without this check the step swaps or
stalls for minutes (issue 12 measured 7.4 GB and ~10 minutes before two SIGTERMs got through). The estimate
counts only what the step cannot avoid, so a shape that is refused surely does not fit; one that passes may
still be tight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPTConfig
from gpt_lightning.model.attention import MATMUL_ATTENTION_MAX_T
from gpt_lightning.model.loss import chunk_rows_for, softmax_block_rows

GiB = 1024 ** 3


@dataclass
class StepMemory:
    """Bytes one training step needs at least, per process."""
    weights: int       # fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter
    logits: int        # the fused loss's buffers: one row chunk of logits, its fp32 softmax, the (V, C) weight gradient
    activations: int   # per layer, what backward keeps per token: the two norms' inputs (2C), q/k/v (C + 2 G hd),
                       # the attention output (C), the MLP's hidden input (4C for GPT-2): 10C for MHA (the norms'
                       # outputs and gelu(h) are recomputed, see gpt_lightning/model/recompute.py), and
                       # where CPU bf16 training takes `matmul_attention`, its (B, n_head, T, T) probabilities

    @property
    def total(self) -> int:
        return self.weights + self.logits + self.activations


def parameters(c: GPTConfig) -> int:
    """Parameter count from the shape alone (building a model that may not fit is what we avoid)."""
    C, hd = c.n_embd, c.head_dim
    per_layer = C * (C + 2 * c.n_kv_groups * hd) + C * C + 8 * C * C  # qkv, proj, MLP (biases ignored)
    return c.padded_vocab_size * C + c.block_size * C + c.n_layer * per_layer


def step_memory(c: GPTConfig, batch_size: int, precision: str, cpu: bool = False) -> StepMemory:
    """Lower bound on one training step's memory (fp32 weights; activations in the compute dtype of `precision`;
    `cpu`: the step runs on the CPU, where bf16 training keeps attention probabilities up to
    MATMUL_ATTENTION_MAX_T positions, as `takes_matmul_attention` decides)."""
    act = 2 if str(precision).startswith(("bf16", "16")) else 8 if str(precision).startswith("64") else 4
    N, V = batch_size * c.block_size, c.padded_vocab_size  # tokens per step, padded vocabulary
    rows = chunk_rows_for(N, V)  # lm_head_loss's chunk
    softmax = 0 if act == 4 else softmax_block_rows(rows, torch.bfloat16) * V * 4  # fp32 scratch beside the chunk
    matmul_attention = cpu and str(precision).startswith("bf16") and c.block_size <= MATMUL_ATTENTION_MAX_T
    probabilities = N * c.block_size * c.n_head * act if matmul_attention else 0  # (B, n_head, T, T) bf16
    per_token = 2 * c.n_embd + (c.n_embd + 2 * c.n_kv_groups * c.head_dim) + c.n_embd + c.hidden  # kept per layer
    return StepMemory(weights=16 * parameters(c),
                      logits=rows * V * act + softmax + V * c.n_embd * act,
                      activations=c.n_layer * (N * per_token * act + probabilities))


def available_memory(cuda: bool) -> tuple[int, str] | None:
    """(bytes, where) a process may still use: free GPU memory, or the smaller of MemAvailable and the cgroup limit."""
    if cuda:
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free, where = int(meminfo["MemAvailable"].split()[0]) * 1024, "RAM available (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return None
    try:  # a container's limit (cgroup v2) may be lower than the machine's
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and int(limit) - used < free:
            free, where = int(limit) - used, "left under this container's memory limit"
    except (OSError, ValueError):
        pass
    return free, where


def check_memory(c: GPTConfig, batch_size: int, precision: str, cuda: bool, processes: int = 1) -> None:
    """Refuse, with the numbers, a step that needs more memory than is free (`processes` share a CPU's RAM)."""
    free = available_memory(cuda)
    if free is None:
        return
    need = step_memory(c, batch_size, precision, cpu=not cuda)
    total = need.total * (1 if cuda else processes)
    if total <= free[0]:
        return
    per = f" x {processes} processes" if processes > 1 and not cuda else ""
    raise UserError(
        f"model.block_size={c.block_size} with data.batch_size={batch_size} ({c.n_layer} layers x {c.n_embd}, "
        f"vocabulary {c.vocab_size}, {precision}) needs at least {total / GiB:.1f} GiB for one training step{per} "
        f"(LM head + loss {need.logits / GiB:.1f}, activations {need.activations / GiB:.1f}, weights and AdamW "
        f"{need.weights / GiB:.1f} GiB), but only {free[0] / GiB:.1f} GiB are {free[1]}; "
        f"lower data.batch_size or model.block_size")
