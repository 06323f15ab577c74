"""Peak memory of this process: CUDA's peak allocation, or the peak resident set on a CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:  # Linux: this process's own peak (getrusage's ru_maxrss carries a parent's peak across fork + exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "process peak RSS"
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"
