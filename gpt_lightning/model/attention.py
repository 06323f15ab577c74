"""Attention kernels behind `CausalSelfAttention`: decode against the KV cache, and the path training takes.

Query head i reads KV head i // (n_head // G) (contiguous groups). K/V are never expanded to n_head heads except
where that buys SDPA a faster kernel (below). The paths:
- decode (a few new tokens against a KV cache of G heads): `decode_attention`, by default `grouped_attention`,
  which folds each KV head's group of query heads into the query dimension, (B, G, n_head/G * T, hd) against
  (B, G, L, hd): plain batched matmuls that read each cached key and value once per step; SDPA or an fp32 copy of a
  small cache where the dev CPU measured that faster;
- a decode step replayed from a CUDA graph (GPUs): `masked_decode_attention`, the same grouped layout through one
  SDPA call over a fixed prefix of the cache's buffers, keys after the position masked (fixed shapes);
- training on the CPU in bf16 up to MATMUL_ATTENTION_MAX_T positions: `matmul_attention`, the same grouped layout
  as two matmuls around an fp32 softmax (the CPU flash kernel's bf16 backward is slow there);
- training otherwise, and prefill: SDPA. Its fused kernels do not all take `enable_gqa` (on CUDA, flash and cuDNN
  may refuse it, and in fp32 GQA can fall back to the math path while MHA gets a fused kernel), so at its first
  call an attention layer asks SDPA which backend it would pick for GQA and for MHA at the same shape
  (`sdpa_backend`) and expands K/V to n_head heads when that gets a faster kernel (`expand_kv_for_speed`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

GROUPED_MAX_T = 8  # new tokens per step up to which decode against a cache takes the grouped form
# Reduced-precision decode reads the cache in multiples of this many positions (masking the rest): oneDNN builds a
# new bf16 matmul primitive for every new key length, ~0.9 ms each on the dev CPU, which a growing cache would
# otherwise pay at every step (a batch-1 step of the 6 x 384 model takes ~3 ms).
KEY_BUCKET = 64
# Reduced-precision decode against a filled cache of at most this many elements per tensor (B * G * L * hd) casts the
# filled keys/values to fp32 and takes the fp32 path: on the dev CPU bf16 SDPA and bf16 matmuls cost 40-100 us
# even for a handful of keys, the cast + fp32 kernel half that (8 heads of 32, B1 L128 MQA: 59 us -> 25; B8 L128
# MHA: 159 -> 88; B32 L512 MQA: 338 -> 247). Beyond it the cast's extra traffic loses (B32 L1024 MQA: 371 vs 434).
FP32_CAST_MAX_ELEMENTS = 1 << 19

# Reduced-precision training on the CPU up to this many positions takes `matmul_attention` instead of SDPA: the
# CPU flash kernel's bf16 backward is slow at short sequences. Forward + backward per layer on the dev CPU (bf16):
# T128 (16 x 8 heads of 32) 21.3 -> 5.9 ms, T256 (8 x 6 of 64) 19.1 -> 10.7 ms, T512 (8 x 8 of 32) 55.8 -> 44.8 ms;
# at T1024 flash wins (59 vs 87 ms). In fp32 the two are even (T256: 19.4 vs 19.7 ms): fp32 keeps SDPA.
MATMUL_ATTENTION_MAX_T = 512

# torch.profiler label around attention computed from plain ops (matmuls, softmax), so a step breakdown can count
# them as attention (gpt_lightning/measure/profile.py) rather than as matmuls and softmax.
ATTENTION_SCOPE = "gpt_lightning::attention"

# SDPA backends from fastest to slowest, as a rule of thumb: the fused kernels, then the unfused math path.
BACKEND_RANK = {"flash_attention": 0, "cudnn_attention": 0, "efficient_attention": 1, "overrideable": 2, "math": 3}


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Causal attention of T new queries (B, n_head, T, hd) against the L = cached + T keys/values (B, G, L, hd).

    The new queries are the last T positions: query t sees keys 0 .. L - T + t. With `length`, only the first
    `length` of k/v's positions are real (the rest, up to a bucket boundary, are masked out). Scores and softmax in
    fp32 for bf16 inputs (as SDPA's math path); returns (B, n_head, T, hd).
    """
    B, nh, T, hd = q.shape
    G, L = k.size(1), length or k.size(2)
    qg = q.reshape(B, G, nh // G * T, hd) * (1.0 / math.sqrt(hd))  # (B, G, R*T, hd): row r*T + t is head g*R + r
    att = torch.matmul(qg, k.transpose(-2, -1)).float()  # (B, G, R*T, L_bucket)
    if L < k.size(2):
        att[..., L:] = float("-inf")  # bucket padding: stale or zero cache slots
    if T > 1:  # a chunk: its own later tokens are in the future
        future = torch.ones(T, L, dtype=torch.bool, device=q.device).triu_(L - T + 1)  # (T, L)
        att[..., :L] = att[..., :L].masked_fill(future.repeat(nh // G, 1), float("-inf"))
    y = torch.matmul(att.softmax(dim=-1).to(v.dtype), v)  # (B, G, R*T, hd)
    return y.view(B, nh, T, hd)


class MatmulAttention(torch.autograd.Function):
    """Causal self-attention as two batched matmuls around an fp32 softmax, keeping the probabilities (in the inputs'
    dtype) and the queries for backward. Query groups are folded as in `grouped_attention`: K/V
    stay at G heads, and the gradients of the query heads that share a KV head are summed by the matmuls themselves.
    First-order only (`once_differentiable`): a double backward raises instead of returning wrong values."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, nh, T, hd = q.shape
        G = k.size(1)
        with record_function(ATTENTION_SCOPE), torch.autocast(q.device.type, enabled=False):  # dtypes chosen here
            qg = q.reshape(B, G, nh // G * T, hd)  # (B, G, R*T, hd): row r*T + t is head g*R + r at position t
            # the scale in fp32, on the scores: scaling the bf16 queries first doubled the gradients' rounding error
            scores = torch.matmul(qg, k.transpose(-2, -1)).float().mul_(1.0 / math.sqrt(hd))  # (B, G, R*T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1).repeat(nh // G, 1)  # (R*T, T)
            scores.masked_fill_(future, float("-inf"))
            p = torch.softmax(scores, dim=-1, out=scores).to(v.dtype)  # (B, G, R*T, T)
            y = torch.matmul(p, v)  # (B, G, R*T, hd)
        ctx.save_for_backward(qg, k, v, p)
        return y.view(B, nh, T, hd)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        qg, k, v, p = ctx.saved_tensors
        B, G, RT, hd = qg.shape
        with record_function(ATTENTION_SCOPE), torch.autocast(qg.device.type, enabled=False):
            dyg = dy.reshape(B, G, RT, hd).to(v.dtype)  # (B, G, R*T, hd)
            dv = torch.matmul(p.transpose(-2, -1), dyg)  # (B, G, T, hd)
            # softmax backward, dS = P * (dP - rowsum(dP * P)), in place over dP: two (R*T, T) fp32 buffers at most
            dp = torch.matmul(dyg, v.transpose(-2, -1)).float()  # (B, G, R*T, T)
            rowsum = (dp * p).sum(-1, keepdim=True)  # (B, G, R*T, 1)
            ds = dp.sub_(rowsum).mul_(p).mul_(1.0 / math.sqrt(hd)).to(qg.dtype)  # (B, G, R*T, T), scaled
            dq = torch.matmul(ds, k)  # (B, G, R*T, hd)
            dk = torch.matmul(ds.transpose(-2, -1), qg)  # (B, G, T, hd)
        return dq.view(dy.shape), dk, dv


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (B, n_head, T, hd) against k, v (B, G, T, hd) -> (B, n_head, T, hd); see
    `MatmulAttention`, and MATMUL_ATTENTION_MAX_T for where training takes it."""
    return MatmulAttention.apply(q, k, v)


def takes_matmul_attention(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether training attention over q (B, n_head, T, hd) takes `matmul_attention`: on the CPU, in bf16 (fp16's
    unscaled q.k^T could overflow), with gradients, no attention dropout, 1 < T <= MATMUL_ATTENTION_MAX_T, and not
    under torch.compile."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and dropout_p == 0 and 1 < q.size(2) <= MATMUL_ATTENTION_MAX_T and not torch.compiler.is_compiling())


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, length: int) -> torch.Tensor:
    """Attention of T <= GROUPED_MAX_T new queries (B, n_head, T, hd) against a cache's (B, G, max_len, hd) buffers
    whose first `length` positions are filled (the new tokens' included). K/V are never expanded to n_head heads.

    - One new token, MHA: SDPA (on the CPU not in reduced precision). On the CPU in fp32 it beat the grouped
      matmuls at every batch x context of the decode grid (B32, L992: 1.31-1.43 ms vs 1.62-1.69); re-measured with
      torch 2.13 the two were within ~20% of each other, the winner changing between runs. On an H100
      (README "Measured on an H100") fp32 eager decode appeared host-bound (2% of the read limit), and MHA (one
      SDPA call) beat both GQA-4 and MQA (grouped form, ~6 calls) in 9 of the fp32 grid's 12 cells; in bf16 at
      batch 64 GQA/MQA were 1.54x faster. On a GPU, generate/evaluate/bench decode steps now replay a CUDA graph of the
      whole step instead (`graphed_decode`, attention by `masked_decode_attention`) unless `cuda_graph=False`.
    - One new token at batch 1 on the CPU (fp32, fp64): SDPA for GQA and MQA too; its flash kernel takes GQA natively
      and beat the grouped matmuls at every context (8 heads of 32, MQA L128: 8 us vs 19; L1024: 36 vs 42).
    - Otherwise the grouped form, which reads each KV head once for its whole query group (SDPA reads it once per
      query head: B32 L1024 MQA, 702 us vs 314).
    - bf16/fp16 on the CPU: a small filled cache (FP32_CAST_MAX_ELEMENTS) is cast to fp32 and takes the fp32 path;
      a larger one the grouped form in its own dtype, over `length` rounded up to KEY_BUCKET positions.
    Timings: dev CPU, README "Attention kernels".
    """
    B, nh, T, hd = q.shape
    G = cache_k.size(1)
    cpu, reduced = q.device.type == "cpu", q.dtype in (torch.bfloat16, torch.float16)
    if cpu and reduced and B * G * length * hd <= FP32_CAST_MAX_ELEMENTS:
        k, v = cache_k[:, :, :length].float(), cache_v[:, :, :length].float()  # (B, G, L, hd) fp32 copies
        return decode_attention(q.float(), k, v, length).to(q.dtype)
    if T == 1 and not (cpu and reduced) and (G == nh or (cpu and B == 1)):
        return F.scaled_dot_product_attention(q, cache_k[:, :, :length], cache_v[:, :, :length],
                                              enable_gqa=G != nh)
    end = min(cache_k.size(2), -(-length // KEY_BUCKET) * KEY_BUCKET) if cpu and reduced else length
    return grouped_attention(q, cache_k[:, :, :end], cache_v[:, :, :end], length)


def masked_decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            pos: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per row (B, n_head, 1, hd) at position `pos`, a (1,) tensor, against (B, G, L, hd)
    cache buffers (L >= pos + 1), keys after `pos` masked out: no shape depends on how much of the cache is filled,
    so a CUDA graph captured once replays at every position up to L (`model.graphed_decode`, which passes a key
    bucket's prefix of the cache). K/V stay at G heads: each KV head's n_head/G query heads ride as that head's
    query rows, (B, G, n_head/G, hd), as in `grouped_attention`, so each cached key and value is read once. It reads
    all L positions every step, where `decode_attention` reads the filled ones: the price of a fixed shape."""
    B, nh, _, hd = q.shape
    G, L = cache_k.size(1), cache_k.size(2)
    visible = (torch.arange(L, device=q.device) <= pos).view(1, 1, 1, L)  # keys 0..pos, every row
    y = F.scaled_dot_product_attention(q.reshape(B, G, nh // G, hd), cache_k, cache_v, attn_mask=visible)
    # reshape, not view: CUDA's fused kernels return (B, G, R, hd) laid out as (B, R, G, hd), which no view merges
    return y.reshape(B, nh, 1, hd)  # row r of group g is query head g * (n_head / G) + r


def expand_kv_for_speed(gqa_backend: str, mha_backend: str) -> bool:
    """True when SDPA would run GQA (`enable_gqa`) on a slower backend than MHA at the same shape gets.

    Backends are SDPBackend names in lower case ("flash_attention", "efficient_attention", "math", ...). Then
    expanding K/V to n_head heads (one copy per layer) buys the fused kernel MHA uses.
    """
    return BACKEND_RANK.get(gqa_backend, 3) > BACKEND_RANK.get(mha_backend, 3)


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, is_causal: bool,
                 enable_gqa: bool) -> str:
    """The backend SDPA's dispatcher picks for these inputs (respecting any `sdpa_kernel` context), in lower case."""
    choice = torch._fused_sdp_choice(q, k, v, None, dropout_p, is_causal, enable_gqa=enable_gqa)
    return SDPBackend(choice).name.lower()


def choose_sdpa_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, is_causal: bool,
                     probe=None) -> tuple[bool, str]:
    """(expand K/V?, a label of the path) for GQA inputs q (B, n_head, T, hd), k/v (B, G, T, hd).

    MHA at the same shape is probed with q standing in for the expanded K/V (same shape, dtype and device).
    MHA inputs (k with n_head heads) just get their backend named. `probe` defaults to `sdpa_backend`.
    """
    probe = probe or sdpa_backend
    if k.size(1) == q.size(1):
        return False, probe(q, k, v, dropout_p, is_causal, False)
    gqa = probe(q, k, v, dropout_p, is_causal, True)
    mha = probe(q, q, q, dropout_p, is_causal, False)
    if expand_kv_for_speed(gqa, mha):
        return True, f"{mha} (K/V expanded; enable_gqa would take {gqa})"
    return False, f"{gqa} (enable_gqa)"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, is_causal: bool,
         expand_kv: bool) -> torch.Tensor:
    """SDPA of q (B, n_head, T, hd) against k, v (B, G, S, hd), GQA either native or with K/V expanded."""
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1 and expand_kv:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, n_head, S, hd)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=q.size(1) != k.size(1))
