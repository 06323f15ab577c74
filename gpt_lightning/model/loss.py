"""The training loss: next-token cross-entropy over the real vocabulary.

`lm_head_loss` (what `GPT.forward` uses) fuses the LM head with the loss and walks the rows in chunks, so the
full (N, V) logits and their gradient never exist at once. `NextTokenLoss` is the same loss on ready-made logits.
"""

from __future__ import annotations

import torch

from gpt_lightning.model import cpu_matmul
from gpt_lightning.model.recompute import TiedGradient, compute_dtype

# Rows per chunk of the fused LM head + loss: at most CHUNK_ELEMENTS // V_padded (667 at the gpt2 vocabulary),
# split evenly (2048 rows: 4 x 512), so one chunk's fp32 logits are ~100 MB where the whole (N, V) would be
# 400 MB. Fewer, bigger chunks pass over the (V, C) weight gradient fewer times; on the dev CPU at 2048 rows,
# C = 384, four chunks cost no time against one (README, "A lean LM head + loss"; measured with aten's addmm_ for
# the weight gradient, before fp32 on a CPU took oneDNN's products).
CHUNK_ELEMENTS = 1 << 25
# Under bf16 the fp32 softmax of a chunk runs in this many row blocks (see LMHeadLoss.forward).
SOFTMAX_BLOCKS = 4
# fp32 on a CPU, and bf16/fp16: the weight gradient is built in at most this many vocabulary blocks per chunk (fewer below 512
# vocabulary rows; see weight_gradient_block_rows).
WEIGHT_GRADIENT_BLOCKS = 8


def weight_gradient_block_rows(padded_vocab: int) -> int:
    """Vocabulary rows per block of the oneDNN weight gradient: padded_vocab / WEIGHT_GRADIENT_BLOCKS, rounded up
    to a multiple of 64 (6336 at the gpt2 vocabulary)."""
    return -(-padded_vocab // WEIGHT_GRADIENT_BLOCKS // 64) * 64


def chunk_rows_for(n_rows: int, padded_vocab: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk of `lm_head_loss`: `chunk_rows` or CHUNK_ELEMENTS // padded_vocab, then split evenly."""
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // padded_vocab)
    return -(-n_rows // -(-n_rows // rows))  # equal chunks: 2048 rows in 4 x 512, not 3 x 667 + 47


def softmax_block_rows(chunk_rows: int, dtype: torch.dtype) -> int:
    """Rows of the fp32 softmax at a time: the whole chunk in fp32 (in place over the logits), a quarter of it in
    a reduced-precision dtype (copied into an fp32 scratch of that many rows)."""
    return chunk_rows if dtype == torch.float32 else -(-chunk_rows // SOFTMAX_BLOCKS)


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                 chunk_rows: int | None = None, tied: TiedGradient | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight[:vocab].T` (N, C) x (V_padded, C) against (N,) targets.

    Equal to F.cross_entropy(F.linear(hidden, weight)[:, :vocab], targets) in value and in its gradients w.r.t.
    `hidden` and `weight` (the padding rows of `weight` get zero gradient). Under autocast the two matmuls run in
    the autocast dtype (as F.linear would) and the softmax in fp32.

    With `tied` (the weight is also the token embedding, read through `tied_embedding`), backward leaves the weight
    gradient in `tied` for the embedding's backward to complete in place, and returns none itself: the autograd
    engine would otherwise hold this (V, C) gradient while the embedding's own dense (V, C) one is built.
    """
    dtype = compute_dtype(hidden, hidden.dtype)
    N = hidden.size(0)
    rows = chunk_rows_for(N, weight.size(0), chunk_rows)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LMHeadLoss.apply(hidden, weight, targets, vocab, rows, dtype, need_grad, tied)


class LMHeadLoss(torch.autograd.Function):
    """The LM head and the cross-entropy in row chunks, gradients computed in the forward pass.

    Per chunk of rows: logits (rows, V) by one matmul into a buffer reused by every chunk (under bf16 copied once
    into an fp32 buffer); then in place in fp32: the row max, the softmax, the loss lse - logit[target] with
    lse = max + log(sum) = max - log(max p) (max p >= 1/V never underflows, where log(p[target]) could); and,
    when a backward will follow, the gradient of the summed loss (softmax - onehot) written back over the logits,
    then folded at once into grad_hidden (rows, C) and grad_weight (V, C, with the mean's 1/N applied by the GEMM,
    or by the blocked add of `add_weight_gradient_in_blocks`, for fp32 on a CPU and for bf16/fp16 everywhere: the
    weight gradient is summed in fp32 whatever the compute dtype).
    Only those two (the size of the inputs) are kept for backward, which just scales them. So no (N, V) buffer is
    ever alive, and, unlike recomputing the logits in
    backward ("cut cross-entropy"), the LM head's three matmuls run once each, as unfused.

    Each elementwise step takes a whole chunk: on the shared 2-core dev CPU, cache-sized blocks of a few rows
    (thousands of small multi-threaded ops per step) ran 3-9x slower whenever another process held a core.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab, rows, dtype, need_grad, tied):
        with torch.autocast(hidden.device.type, enabled=False):
            N, V = hidden.size(0), weight.size(0)
            h = hidden.to(dtype)  # (N, C)
            w = weight.to(dtype)  # (V_padded, C): padded, so the matmuls keep their fast shapes
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            if need_grad:  # allocated before the chunk buffers, which go when forward returns (less heap left in holes)
                grad_h = torch.empty_like(h)  # (N, C)
                # (V_padded, C), summed in fp32 whatever the compute dtype: summed in bf16 its error grew with the
                # number of chunks (2.6e-3 relative at 1 chunk, 1.4e-2 at 128), and in fp16 with the 1/N inside,
                # before GradScaler's scale exists, the rare tokens' rows underflowed
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            onednn = cpu_matmul.takes_onednn(h, w)  # fp32 on a CPU: oneDNN's products, each into a new tensor
            buffer = None if onednn else torch.empty(min(rows, N), V, dtype=dtype, device=hidden.device)  # reused
            # Under bf16 the fp32 softmax runs over a quarter of a chunk at a time: the matmuls keep their chunk
            # (256-row chunks cost 2-3% of a step on the dev CPU), the fp32 scratch is a quarter of its size.
            sub = softmax_block_rows(min(rows, N), dtype)
            probs = None if dtype == torch.float32 else torch.empty(sub, V, device=hidden.device)  # fp32: in place
            for s in range(0, N, rows):
                hs = h[s:s + rows]  # (n, C)
                n = hs.size(0)
                logits = cpu_matmul.mm(hs, w.t()) if onednn else torch.mm(hs, w.t(), out=buffer[:n])  # (n, V_padded)
                for b in range(0, n, sub):
                    lb, t = logits[b:b + sub], targets[s + b:s + min(b + sub, n), None]  # (k, V_padded), (k, 1)
                    x = lb if probs is None else probs[:lb.size(0)].copy_(lb)  # (k, V_padded) fp32
                    x[:, vocab:] = float("-inf")  # padding columns: no probability mass, zero gradient
                    m = x.amax(dim=1, keepdim=True)  # (k, 1)
                    x_t = x.gather(1, t)  # (k, 1)
                    p = torch.softmax(x, dim=1, out=x)  # (k, V_padded) fp32, in place
                    lse = m - p.amax(dim=1, keepdim=True).log()  # p at the max is exp(0) / sum = 1 / sum
                    total += (lse - x_t).sum()
                    if need_grad:
                        p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - onehot: N x d(mean loss)/d(logits)
                        if p is not lb:  # back over the bf16 logits, unscaled: a multiply by 1/N with a bf16 out=
                            lb.copy_(p)  # took 4x a plain copy (~3% of a bf16 step); the GEMMs below take the 1/N
                if need_grad:
                    if onednn:
                        grad_h[s:s + n] = cpu_matmul.mm(logits, w)  # (n, C): N x its share; backward divides by N
                    else:
                        torch.mm(logits, w, out=grad_h[s:s + n])
                    # (V_padded, C), the 1/N applied as each chunk is summed: the summed loss's weight gradient grows
                    # with N and would overflow fp16 at large batches
                    if dtype == torch.float32 and not onednn:
                        grad_w.addmm_(logits.t(), hs, alpha=1.0 / N)  # fp32 in, fp32 sum: the 1/N free in the GEMM
                    else:
                        add_weight_gradient_in_blocks(grad_w, logits, hs, 1.0 / N, transpose_copy=onednn)
                logits = lb = x = p = None  # this chunk's logits go before the next chunk's are made
            # Kept on ctx, not saved for backward: backward scales them in place and hands them over, so the
            # (V, C) weight gradient is never there twice. The price: one backward per forward (no retain_graph).
            ctx.grads = (grad_h, grad_w) if need_grad else None
            ctx.dtypes, ctx.tied, ctx.rows = (hidden.dtype, weight.dtype), tied, N
            return total / N

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("lm_head_loss: backward ran twice (retain_graph) or without gradients from forward")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        h_dtype, w_dtype = ctx.dtypes
        grad_w = grad_w.mul_(grad).to(w_dtype) if ctx.needs_input_grad[1] else None  # already the mean's
        if ctx.tied is not None:
            ctx.tied.grad, grad_w = grad_w, None
        return grad_h.mul_(grad / ctx.rows).to(h_dtype), grad_w, None, None, None, None, None, None


def add_weight_gradient_in_blocks(grad_w: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor,
                                  scale: float, transpose_copy: bool = True) -> None:
    """grad_w (V, C) += scale * grad_logits.T @ hidden, for (n, V) grad_logits and (n, C) hidden: the product in their
    dtype, the sum in grad_w's (fp32). For fp32 on a CPU (oneDNN's products, `transpose_copy`), and for bf16/fp16,
    whose products cannot add into an fp32 tensor in one GEMM (`addmm_` wants one dtype; CUDA's `out_dtype` has no
    CPU kernel): a block's bf16 product is rounded once and summed in fp32, so the error stays that of one bf16
    product however many chunks a step has (fp16 takes fp32 products: see below) (an fp32 sum of a whole (V, C) bf16 product per chunk would make a
    vocabulary-sized temporary per chunk; a block's is (Vb, C)).

    In blocks of `weight_gradient_block_rows(V)` vocabulary rows: each block's (n, Vb) gradient is copied transposed,
    contiguous (with `transpose_copy`; aten's bf16 GEMM takes the transposed view as it is), and multiplied into a
    (Vb, C) product that is added to grad_w. On the dev CPU at 512 rows (the bench
    shape), the 4 chunks of a step take ~236 ms this way, against ~390 ms by aten's addmm_ (MKL's AVX2 path,
    ~204 GFLOP/s). Whole-vocabulary oneDNN products were as fast or faster (h.T @ g as (C, V): ~190 ms; g.T @ h
    as (V, C): ~240 ms), but oneDNN writes each product to a new tensor, and that second vocabulary-sized tensor
    per chunk beside the sum raised the bench step's peak RSS from ~850 to 980-1110 MB (the heap holes it left).
    A block's copy and product are 13 + 10 MB.
    """
    V = grad_w.size(0)
    rows = weight_gradient_block_rows(V)
    if fp32_product_available(grad_logits):  # CUDA bf16/fp16: tensor-core GEMMs that write fp32
        for a in range(0, V, rows):
            grad_w[a:a + rows].add_(torch.mm(grad_logits[:, a:a + rows].t(), hidden, out_dtype=torch.float32),
                                    alpha=scale)  # (Vb, C) fp32, accumulated in fp32: nothing rounds to 16 bits
        return
    # fp16: products in fp32. The summed loss's product overflows fp16's 65504 at large chunks (8192 rows of
    # |hidden| ~ 10), and with the mean's 1/N inside the GEMM the rare tokens' rows underflow instead.
    wide = grad_logits.dtype == torch.float16
    hidden = hidden.float() if wide else hidden
    for a in range(0, V, rows):
        block = grad_logits[:, a:a + rows].t()  # (Vb, n)
        block = block.float() if wide else block.contiguous() if transpose_copy else block
        grad_w[a:a + rows].add_(cpu_matmul.mm(block, hidden), alpha=scale)  # (Vb, C)


_fp32_product: dict[tuple, bool] = {}  # (device type, dtype) -> whether torch.mm(..., out_dtype=fp32) ran there


def fp32_product_available(t: torch.Tensor) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` (aten::mm.dtype) has a kernel for this 16-bit tensor's
    device: CUDA's (cuBLAS, fp32 accumulate and output); the CPU has none (torch 2.13), nor does fp32 need it.
    Tried once per (device type, dtype) on a tiny product; a build without it takes the blocked path above, which
    on CUDA would run fp16 as fp32 GEMMs (no tensor cores) and bf16 as rounded products (not measured on a GPU)."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.device.type != "cuda":
        return False
    key = (t.device.type, t.dtype)
    if key not in _fp32_product:
        try:
            probe = torch.ones(2, 2, dtype=t.dtype, device=t.device)
            _fp32_product[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _fp32_product[key] = False
    return _fp32_product[key]


class NextTokenLoss(torch.autograd.Function):
    """Mean cross-entropy of (N, V_padded) logits against (N,) targets over the first `vocab` columns only,
    with a lean backward.

    Same value and gradient as F.cross_entropy(logits[:, :vocab], targets): the padding columns take no
    probability mass (a zero-initialised padding row, as after loading GPT-2 weights, must not distort the loss)
    and get a zero gradient. The backward is softmax = exp(log_softmax) written straight into the gradient
    buffer, minus one at each target: on the dev CPU at 2048 x 50304 this takes ~0.1 s where aten's
    log_softmax backward takes ~0.5 s (a fifth of a whole training step at the bench shape).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)  # (N, vocab) fp32, also under bf16 autocast
        ctx.save_for_backward(logp, targets)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return -logp.gather(1, targets[:, None]).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, targets = ctx.saved_tensors
        N, vocab = logp.shape
        g = logp.new_empty(ctx.logits_shape)  # (N, V_padded) fp32
        g[:, vocab:] = 0
        torch.exp(logp, out=g[:, :vocab])  # softmax
        g.scatter_add_(1, targets[:, None], g.new_full((N, 1), -1.0))
        g.mul_(grad / N)
        return g.to(ctx.logits_dtype), None, None
