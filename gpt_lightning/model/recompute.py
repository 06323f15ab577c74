"""Training-memory savers: autograd Functions that keep fewer or smaller tensors alive than aten's ops would.

- `gelu_linear`: the MLP's second half, c_proj(gelu(h)), keeping only h for backward. aten would also keep
  gelu(h), another (B, T, 4C) per layer: about a quarter of a block's saved activations. Backward recomputes
  gelu(h) (one elementwise pass) instead.
- `tied_embedding` + `TiedGradient`: the token embedding of a weight shared with the LM head. aten's embedding
  backward allocates a dense (V, C) gradient and the autograd engine then adds it to the LM head's (V, C)
  gradient: two vocabulary-sized tensors at once (77 MB each at the gpt2 vocabulary, C = 384, fp32). Here the
  LM head's loss hands its gradient over through a `TiedGradient`, and the embedding backward adds its rows to it
  in place: one (V, C) tensor.

Both give aten's values and gradients (tests/test_recompute.py) and honour autocast the way F.linear does (the
matmul in the autocast dtype, gradients in each input's own dtype). Under torch.compile `GPT` uses plain ops:
the compiler decides what to keep on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
            out = F.linear(a, weight.to(dtype), None if bias is None else bias.to(dtype))  # (..., C)
        ctx.save_for_backward(h, weight)
        ctx.dtype, ctx.bias_dtype = dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(h.device.type, enabled=False):
            hd = h.to(dtype)
            w = weight.to(dtype)  # (C, H)
            g = grad.to(dtype).reshape(-1, grad.size(-1))  # (N, C)
            a = F.gelu(hd, approximate="tanh").reshape(-1, h.size(-1))  # (N, H), recomputed
            grad_w = (g.t() @ a).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (C, H)
            grad_b = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
            grad_h = None
            if ctx.needs_input_grad[0]:
                grad_a = (g @ w).view(h.shape)  # (..., H)
                grad_h = torch.ops.aten.gelu_backward(grad_a, hd, approximate="tanh").to(h.dtype)
        return grad_h, grad_w, grad_b, None


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
