"""fp32 matmuls on CPUs through oneDNN instead of aten's (MKL's) kernel, for training.

On a CPU, aten's fp32 `mm`/`addmm`/`F.linear` are MKL's, and MKL takes its AVX2 path on AMD CPUs. oneDNN (which
torch ships, and which aten already uses for bf16) runs AVX-512 there, in full fp32 (relative error ~1e-6 against
fp64, as MKL's). Dev VM (AMD EPYC, AVX-512), 2 threads, GFLOP/s, aten -> oneDNN:
- a 2048^3 product: 221 -> 489;
- the bench shape's block linears at 2048 rows: forward 183-219 -> 417-486, input gradient 208-223 -> 461-515,
  weight gradient 207-221 -> 340-347;
- the LM head in 512-row chunks: logits 155 -> 275, hidden-state gradient 214 -> 382 (with fresh pages; ~450 and
  ~390 with the heap kept, as in training); its weight gradient, which accumulates into the (V, C) gradient across
  chunks, 204 -> ~330 in vocabulary blocks (loss.add_weight_gradient_in_blocks).

`onednn_linear_available` says whether this torch build has oneDNN's linear (decode's weight layout asks it too).
`linear` and `mm` take oneDNN for fp32 CPU tensors and aten for everything else (bf16 and CUDA keep aten's
kernels). The autograd Functions of a training step call them: `Linear` here (attention's output projection),
and `LayerNormLinear`, `GeluLinear` and `LMHeadLoss` (recompute.py, loss.py). Results match aten's to fp32
rounding (not bit for bit: another kernel sums in another order); tests/test_cpu_matmul.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's linear, x (..., in) against a (out, in) weight, plain or prepacked (`_reorder_linear_weight`), with no
    fused activation: the one call every oneDNN product here goes through. It flattens x's leading dims itself."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's prepacked linear (what inductor uses on CPUs) works in this torch build, on this CPU, in `dtype`:
    fp16 needs avx_ne_convert or avx512_fp16, bf16 AVX-512 (an AVX2-only CPU has neither), fp32 only the build."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=dtype), 1)
        return onednn_linear(torch.ones(1, 4, dtype=dtype), packed).shape == (1, 4)
    except (AttributeError, RuntimeError):
        return False


def takes_onednn(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, with oneDNN's linear in this torch build."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and onednn_linear_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for (..., in) x and (out, in) weight -> (..., out); no autograd (called inside
    Functions' forward and backward)."""
    if takes_onednn(x, weight):  # oneDNN reads the bias as contiguous
        return onednn_linear(x, weight, None if bias is None else bias.contiguous())
    return F.linear(x, weight, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (n, k) a and (k, m) b -> (n, m), transposed views welcome; no autograd."""
    if takes_onednn(a, b):
        return onednn_linear(a, b.t())  # a @ (b.t()).t()
    return a @ b


def module_linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """module(x), through `Linear` while training in fp32 on a CPU (gradients on, not compiling, no autocast)."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
            and takes_onednn(x, module.weight)):
        return Linear.apply(x, module.weight, module.bias)
    return module(x)


class Linear(torch.autograd.Function):
    """F.linear with oneDNN's kernels for all three products (fp32 CPU only; see `module_linear`). First-order only:
    oneDNN's product has no derivative of its own, so a double backward raises instead of returning zeros."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))  # (N, out)
        grad_x = mm(g, weight).view(x.shape) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_w = mm(g.t(), x.reshape(-1, x.size(-1))) if ctx.needs_input_grad[1] else None  # (out, in)
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b
