"""Training-memory savers: autograd Functions that keep fewer or smaller tensors alive than aten's ops would.

- `gelu_linear`: the MLP's second half, c_proj(gelu(h)), keeping only h for backward. aten would also keep
  gelu(h), another (B, T, 4C) per layer: about a quarter of a block's saved activations. Backward recomputes
  gelu(h) (one elementwise pass) instead.
- `layer_norm_linear`: a pre-norm block's LayerNorm and the linear after it (ln_1 + c_attn, ln_2 + c_fc), keeping
  only the norm's input for backward. aten keeps the input (for the norm's backward) and the normalised output
  (for the linear's): one more (B, T, C) per norm, two per layer, 38 MB of the bench shape's ~230 MB of fp32
  activations. Backward recomputes the norm (one pass over (B, T, C), ~0.5% of a step).
- `tied_embedding` + `TiedGradient`: the token embedding of a weight shared with the LM head. aten's embedding
  backward allocates a dense (V, C) gradient and the autograd engine then adds it to the LM head's (V, C)
  gradient: two vocabulary-sized tensors at once (77 MB each at the gpt2 vocabulary, C = 384, fp32). Here the
  LM head's loss hands its gradient over through a `TiedGradient`, and the embedding backward adds its rows to it
  in place: one (V, C) tensor.

All three give aten's values and gradients (tests/test_recompute.py) and honour autocast the way F.linear does (the
matmul in the autocast dtype, gradients in each input's own dtype). Their fp32 products on a CPU run on oneDNN
(`cpu_matmul`). Under torch.compile `GPT` uses plain ops: the compiler decides what to keep on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gpt_lightning.model import cpu_matmul


def compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's for x's device while it is on, else `fallback`."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else fallback


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(F.gelu(h, approximate="tanh"), weight, bias) for (..., H) h and (C, H) weight -> (..., C)."""
    return GeluLinear.apply(h, weight, bias, compute_dtype(h, weight.dtype))


class GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, dtype):
        with torch.autocast(h.device.type, enabled=False):
            a = F.gelu(h.to(dtype), approximate="tanh")  # (..., H): freed when forward returns
            out = cpu_matmul.linear(a, weight.to(dtype), None if bias is None else bias.to(dtype))  # (..., C)
        ctx.save_for_backward(h, weight)
        ctx.dtype, ctx.bias_dtype = dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable  # oneDNN's products (cpu_matmul) have no derivative: raise, never return zeros
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(h.device.type, enabled=False):
            hd = h.to(dtype)
            w = weight.to(dtype)  # (C, H)
            g = grad.to(dtype).reshape(-1, grad.size(-1))  # (N, C)
            a = F.gelu(hd, approximate="tanh").reshape(-1, h.size(-1))  # (N, H), recomputed
            grad_w = cpu_matmul.mm(g.t(), a).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (C, H)
            grad_b = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
            grad_h = None
            if ctx.needs_input_grad[0]:
                grad_a = cpu_matmul.mm(g, w).view(h.shape)  # (..., H)
                grad_h = torch.ops.aten.gelu_backward(grad_a, hd, approximate="tanh").to(h.dtype)
        return grad_h, grad_w, grad_b, None


def layer_norm_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> torch.Tensor:
    """linear(norm(x)) for (..., C) x -> (..., out), without keeping norm(x) for backward while gradients are on.

    Plain modules otherwise: without gradients (decode swaps linears' forwards for its own layouts), under
    torch.compile (the compiler decides what to keep), and where autocast would change the norm's dtype (an input
    in a reduced precision on CUDA), so the values are always those of the two modules.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    exact = (all(p is None or p.dtype == x.dtype for p in (norm.weight, norm.bias))
             and (x.dtype == torch.float32 or not autocast)  # CUDA autocast runs layer_norm in fp32
             and (autocast or linear.weight.dtype == x.dtype))  # without autocast, mixed dtypes raise in F.linear
    if not (exact and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return linear(norm(x))
    return LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, tuple(norm.normalized_shape), linear.weight,
                                 linear.bias, compute_dtype(x, linear.weight.dtype))


class LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, shape, weight, bias, dtype):
        with torch.autocast(x.device.type, enabled=False):
            a = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)[0]  # (..., C): freed on return
            out = cpu_matmul.linear(a.to(dtype), weight.to(dtype),
                                    None if bias is None else bias.to(dtype))  # (..., out)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        ctx.eps, ctx.shape, ctx.dtype, ctx.bias_dtype = eps, shape, dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable  # oneDNN's products (cpu_matmul) have no derivative: raise, never return zeros
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        dtype, C = ctx.dtype, x.size(-1)
        with torch.autocast(x.device.type, enabled=False):
            # The same call as forward on the same input: bit for bit the forward's a, mean and rstd.
            a, mean, rstd = torch.native_layer_norm(x, ctx.shape, norm_weight, norm_bias, ctx.eps)  # (..., C)
            g = grad.to(dtype).reshape(-1, grad.size(-1))  # (N, out)
            grad_w = (cpu_matmul.mm(g.t(), a.to(dtype).reshape(-1, C)).to(weight.dtype) if ctx.needs_input_grad[5]
                      else None)
            grad_b = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[6] else None
            grad_x = grad_nw = grad_nb = None
            wants = [ctx.needs_input_grad[0], norm_weight is not None and ctx.needs_input_grad[1],
                     norm_bias is not None and ctx.needs_input_grad[2]]
            if any(wants):
                grad_a = cpu_matmul.mm(g, weight.to(dtype)).view(x.shape).to(x.dtype)  # (..., C)
                grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                    grad_a, x, ctx.shape, mean, rstd, norm_weight, norm_bias, wants)
        return grad_x, grad_nw, grad_nb, None, None, grad_w, grad_b, None


class TiedGradient:
    """Where the LM head's loss leaves its (V, C) weight gradient for the tied embedding's backward to complete.

    The loss node always runs before the embedding node in backward (the embedding feeds everything the loss
    reads), so by then `grad` holds the LM head's part, or None when the loss computed no weight gradient.
    """

    def __init__(self):
        self.grad: torch.Tensor | None = None


def tied_embedding(idx: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
    """F.embedding(idx, weight) (B, T) -> (B, T, C), whose weight gradient includes what `tied` received."""
    return TiedEmbedding.apply(idx, weight, tied)


class TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, tied):
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad):
        tied, ctx.tied = ctx.tied, None
        grad_w, tied.grad = tied.grad, None  # the LM head's part: completed in place, never copied
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        if grad_w is None:
            grad_w = grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        grad_w.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.size(-1)).to(grad_w.dtype))  # (V, C)
        return None, grad_w, None
