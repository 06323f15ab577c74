"""Which scaled-dot-product-attention backend can run a shape, and which one actually ran.

PyTorch's SDPA dispatches each call to one of four kernels: flash, cuDNN, memory-efficient (cutlass) or math (the
reference that materialises the (T, T) scores). Which ones accept depends on device, dtype, head dim, masks and
GQA: a fused kernel refusing `enable_gqa` inputs silently sends GQA to math while MHA at the same shape stays fused.
The GPU check (tests/gpu/check.sh) uses this to show, for MHA, GQA and MQA in bf16 and fp32:
- `accepted_backends`: each backend tried alone under `sdpa_kernel([backend])`, forward and backward, with the
  reason torch gives for a refusal;
- `backends_that_ran`: the backends whose aten ops the profiler saw while some code (a training step) ran.
On a CPU, torch 2.13 accepts flash (its CPU flash kernel) and math; efficient and cuDNN are CUDA-only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("flash", "cudnn", "efficient", "math")
SDP_BACKEND = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# Speed tiers, fastest first. Flash and cuDNN are tiled fused kernels (tensor cores, bf16/fp16 only) of about the
# same speed on Hopper; memory-efficient is fused too but slower and the only fused one for fp32; math writes the
# (B, nh, T, T) scores to memory and reads them back several times.
TIER = {"flash": 0, "cudnn": 0, "efficient": 1, "math": 2}


def backend_of_op(op: str) -> str | None:
    """The backend an aten op name belongs to, e.g. `aten::_scaled_dot_product_flash_attention_backward` -> flash;
    None for anything that is not a backend's op (the `aten::scaled_dot_product_attention` entry point itself)."""
    if not op.startswith("aten::_scaled_dot_product_"):
        return None
    for name, marker in (("cudnn", "cudnn"), ("efficient", "efficient"), ("flash", "flash"), ("math", "math")):
        if marker in op:  # cudnn before flash: no cuDNN op name contains "flash", but check the specific one first
            return name
    return "other"  # e.g. _scaled_dot_product_fused_attention_overrideable (out-of-tree devices)


def backends_that_ran(fn: Callable[[], object]) -> list[str]:
    """Run `fn` under the profiler; the SDPA backends whose ops it dispatched (sorted fastest tier first).

    Only CPU activity is recorded: aten ops are dispatched on the host for CUDA tensors too, so this needs no
    CUPTI and sees exactly the op the dispatcher chose (by name, not by guessing kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = {backend_of_op(e.key) for e in prof.key_averages()} - {None}
    return sorted(found, key=lambda b: (TIER.get(b, 3), b))


def sdpa_inputs(batch: int, n_head: int, n_kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                device: torch.device | str, requires_grad: bool = True, seed: int = 0):
    """Random (q, k, v): q (B, nh, T, hd), k and v (B, G, T, hd), as CausalSelfAttention passes them."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads):
        return torch.randn(batch, heads, seq, head_dim, generator=g).to(device=device, dtype=dtype) \
            .requires_grad_(requires_grad)

    return rand(n_head), rand(n_kv_heads), rand(n_kv_heads)


def try_backend(backend: str, q, k, v, is_causal: bool = True, backward: bool = True) -> str | None:
    """Run SDPA (and its backward) with only `backend` allowed: None if it ran, else torch's reason (one line)."""
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDP_BACKEND[backend]]):
        warnings.simplefilter("always")
        try:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=k.size(1) != q.size(1))
            if backward and out.requires_grad:
                out.sum().backward()
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            return None
        except RuntimeError as e:
            # torch explains a refusal in UserWarnings ("Flash attention kernel not used because: ...") and then
            # raises "No available kernel"; keep the explanation, it is what a reader needs.
            why = [str(w.message).strip() for w in caught if issubclass(w.category, UserWarning)]
            text = " | ".join(why) if why else str(e)
            return " ".join(text.split())[:300]
        finally:
            for t in (q, k, v):
                t.grad = None


def accepted_backends(q, k, v, is_causal: bool = True, backward: bool = True) -> dict[str, str | None]:
    """{backend: None if it ran these inputs alone (forward + backward), else why not} for every backend."""
    return {b: try_backend(b, q, k, v, is_causal, backward) for b in BACKENDS}


def fastest(backends) -> str | None:
    """The fastest-tier backend of a collection (None when empty)."""
    backends = [b for b in backends if b in TIER]
    return min(backends, key=lambda b: TIER[b]) if backends else None


def slowest(backends) -> str | None:
    """The slowest-tier backend of a collection (None when empty): what bounds a step that used several."""
    backends = [b for b in backends if b in TIER]
    return max(backends, key=lambda b: TIER[b]) if backends else None


def slower_than(backend: str | None, reference: str | None) -> bool:
    """True when `backend` sits in a slower tier than `reference` (flash and cuDNN count as one tier)."""
    if backend is None or reference is None:
        return False
    return TIER.get(backend, 3) > TIER.get(reference, 3)
