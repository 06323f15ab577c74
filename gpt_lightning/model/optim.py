"""AdamW with decay groups and the warmup + cosine learning-rate schedule (pure torch)."""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, optim: dict, fused: bool = False) -> torch.optim.AdamW:
    """AdamW that decays matrices (linear weights, embeddings) and never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), fused=fused)
