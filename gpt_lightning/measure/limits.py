"""The machine's own limits, printed beside every speed figure: dense matmul peak and memory-read bandwidth
(both measured), spec peaks of GPUs, and the decode speed those limits allow."""

from __future__ import annotations

import re
import time

import torch

from gpt_lightning.measure.timing import sync
from gpt_lightning.model.cpu_matmul import onednn_linear, onednn_linear_available


# A GPU does a 2048^3 product in ~20 us, as long as the launch and the host clock around it: there the peak
# is timed on an 8192^3 product (1.1 TFLOP, ~1.4 ms on an H100 in bf16), and each read-bandwidth figure on several
# reductions between two synchronisations (one 256 MB sum is ~80 us at 3 TB/s).
CUDA_MATMUL_N = 8192
CUDA_READS_PER_TIMING = 10


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s for an n x n x n product: the best of the kernels `matmul_peaks` times."""
    return max(matmul_peaks(device, dtype, n, repeats).values())


def matmul_peaks(device: torch.device, dtype: torch.dtype, n: int | None = None,
                 repeats: int = 5) -> dict[str, float]:
    """FLOP/s (best of `repeats`) of an n x n x n product by each kernel torch has for it here: aten's `a @ b`,
    and on a CPU also oneDNN's linear on a prepacked weight (what decode and inductor use), in full precision.
    n defaults to 2048 on a CPU and `CUDA_MATMUL_N` on a GPU.

    On a CPU, aten's fp32 matmul is MKL's, and MKL takes its AVX2 path on AMD CPUs: on the dev VM (AVX-512) it ran
    ~210 GFLOP/s where oneDNN's fp32 ran ~480, with the same fp32 rounding (relative error ~1e-6 against fp64).
    A peak measured with aten alone would understate the machine and inflate every fp32 MFU about twofold.
    """
    n = n or (CUDA_MATMUL_N if device.type == "cuda" else cpu_matmul_n(dtype))
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    kernels = {"aten": lambda: a @ b}
    if device.type == "cpu" and onednn_linear_available(dtype):  # bf16 packing needs AVX-512 (not on AVX2 CPUs)
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)  # a @ b.T, the same FLOPs
        kernels["onednn"] = lambda: onednn_linear(a, packed)
    peaks = {}
    for name, product in kernels.items():
        try:
            product()
        except RuntimeError:  # e.g. oneDNN without a bf16 kernel on this CPU: aten's figure alone
            continue
        best = 0.0
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            product()
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
        peaks[name] = best
    return peaks


def cpu_matmul_n(dtype: torch.dtype, largest: int = 2048, enough_s: float = 0.05) -> int:
    """The CPU peak's product size: 2048, or the first of 256, 512, 1024 whose aten product takes `enough_s`.
    Without AVX-512, aten's bf16/fp16 products fall back to ~1 GFLOP/s loops (an AVX2 EPYC: 1.2 GFLOP/s in bf16,
    100 in fp32), where one 2048^3 product takes ~15 s and a peak (6 of them) a minute and a half; a product
    that long is timed as well at 512."""
    n = 256
    while n < largest:
        a = torch.randn(n, n, dtype=dtype)
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start >= enough_s:
            return n
        n *= 2
    return largest


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured memory-read bandwidth in bytes/s: the best of `repeats` sums over an `nbytes` fp32 tensor (on a GPU
    each timing covers `CUDA_READS_PER_TIMING` sums between two synchronisations).

    A reduction reads every byte once and writes nothing, so it is the ceiling for anything bound by reading
    weights or a KV cache (decode at small batch). 1 GB is far beyond any cache.
    """
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    reads = CUDA_READS_PER_TIMING if device.type == "cuda" else 1  # a GPU's sum is too short to time alone
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(reads):
            x.sum()
        sync(device)
        best = max(best, reads * nbytes / (time.perf_counter() - start))
    return best


def bandwidth_probe(device: torch.device):
    """A quick `read_bandwidth` (256 MB, still 8x the dev CPU's L3; best of 3) to take beside every timed round.
    On a CPU whose last-level cache nears 256 MB it would partly read cache and overstate the bandwidth."""
    return lambda: read_bandwidth(device, nbytes=1 << 28, repeats=3)


def bracketed(measure, limit) -> tuple[float, float]:
    """(measure(), the mean of limit() taken just before and just after it).

    On a shared VM the limits move while a benchmark runs: on the dev VM the read bandwidth swung between ~42 and
    ~77 GB/s from one few-second phase to the next, and a decode step's matrix-vector products with it. A fraction
    of the limit is only meaningful against the limit of the same moment, so each timed round gets its own.
    """
    before = limit()
    value = measure()
    return value, (before + limit()) / 2


def decode_read_limit(bytes_per_step: int, bandwidth: float, batch_size: int = 1) -> float:
    """Tokens/s decode could reach if each step only had to read `bytes_per_step` (weights + KV cache) once."""
    return batch_size * bandwidth / bytes_per_step


# --- Spec peaks of GPUs (dense, per chip) -----------------------------------------------------------------------
# Datasheet matmul peaks WITHOUT structured sparsity: NVIDIA's datasheets print the 2:4-sparse figure (twice the
# dense one) with an asterisk, and Lightning 2.6.6's table copies some of those (H200 SXM 2.0e15, H100 NVL 1.98e15)
# and has no entry at all for a plain "NVIDIA H200". MFU is always against these dense figures.
# Keys: bf16 and fp16 (tensor cores, fp32 accumulate), tf32 (fp32 matmuls with TF32 allowed), fp32 (plain CUDA cores).
DENSE_PEAKS: dict[str, dict[str, float]] = {
    # H100 datasheet (nvidia.com/en-us/data-center/h100, 2023-2024), SXM5 and PCIe columns: bf16 1,979* / 1,513*
    # TFLOP/s and tf32 989* / 756* with sparsity; fp32 67 / 51.
    "h100-sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100-pcie": {"bf16": 756.0e12, "fp16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    # Same datasheet, H100 NVL column (one 94 GB card): bf16 1,671*, tf32 835*, fp32 60.
    "h100-nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    # H200 datasheet (nvidia.com/en-us/data-center/h200, 2024): the SXM part has the H100 SXM's rates (bf16 1,979*,
    # tf32 989*, fp32 67); the NVL part bf16 1,671*, tf32 835*, fp32 60. GH200's GPU is the same Hopper chip at
    # the SXM rates (GH200 datasheet: bf16 1,979*).
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h200-nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "gh200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    # A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM and PCIe alike: bf16 312,
    # tf32 156, fp32 19.5 (dense; 624* / 312* with sparsity).
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    # A10 datasheet (a10-datasheet.pdf): bf16 125 | 250*, tf32 62.5 | 125*, fp32 31.2.
    "a10": {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # L4 datasheet (nvidia-l4-datasheet): bf16 242*, tf32 120*, fp32 30.3.
    "l4": {"bf16": 121.0e12, "fp16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12},
    # L40 datasheet: bf16 181.05 | 362.1*, tf32 90.5 | 181*, fp32 90.5.
    "l40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    # L40S datasheet: bf16 362.05 | 733*, tf32 183 | 366*, fp32 91.6.
    "l40s": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12},
}

# torch.cuda.get_device_name spellings, first match wins (so "H100 NVL" before "H100", "L40S" before "L40" before
# "L4"): "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
# "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A10", "NVIDIA L4", ...
_CARD_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bgh200\b", "gh200"),
    (r"\bh200\b.*\bnvl\b", "h200-nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bnvl\b", "h100-nvl"),
    (r"\bh100\b.*\b(pcie|hbm2e)\b", "h100-pcie"),
    (r"\bh100\b", "h100-sxm"),  # "H100 80GB HBM3", "H100 SXM5": the SXM part
    (r"\ba100\b", "a100"),
    (r"\ba10\b", "a10"),        # not A10G: its tensor rate is not in an NVIDIA datasheet (Lightning's table has it)
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
)

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def card_of(device_name: str) -> str | None:
    """The DENSE_PEAKS key for a CUDA device name (torch.cuda.get_device_name), or None for a card not listed."""
    name = device_name.lower()
    return next((card for pattern, card in _CARD_PATTERNS if re.search(pattern, name)), None)


def dense_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense spec FLOP/s of a card for matmuls in `dtype`; fp32 counts as TF32 when torch allows TF32 matmuls
    (float32_matmul_precision other than "highest"), as Lightning does. None for a card or dtype not listed."""
    card = card_of(device_name)
    if card is None:
        return None
    key = _DTYPE_KEYS.get(dtype)
    if dtype == torch.float32:
        key = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return DENSE_PEAKS[card].get(key) if key else None


def spec_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Spec FLOP/s of this GPU for `dtype`: our dense table (DENSE_PEAKS) where it lists the card, else Lightning's
    table (which lists some cards' sparse figures; ours covers those); None on CPUs and unknown chips."""
    if device.type != "cuda":
        return None
    ours = dense_peak(torch.cuda.get_device_name(device), dtype)
    if ours is not None:
        return ours
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)
