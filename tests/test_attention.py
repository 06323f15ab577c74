"""Decode against the KV cache in the grouped form, and the SDPA path training takes for GQA."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt_lightning.model import GPT, GPTConfig
import gpt_lightning.model.attention as attention
from gpt_lightning.model.attention import (FP32_CAST_MAX_ELEMENTS, GROUPED_MAX_T, KEY_BUCKET, choose_sdpa_path,
                                           decode_attention, expand_kv_for_speed, grouped_attention,
                                           matmul_attention)

ATTENTIONS = {"mha": 4, "gqa": 2, "mqa": 1}  # kv_groups at 4 heads


def tiny(kv_groups=2, dtype=torch.float32, **kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_groups=kv_groups, n_embd=32) | kw
    return GPT(GPTConfig(**args)).to(dtype).eval()


def cached_features(model, idx, prefill: int, chunk: int) -> torch.Tensor:
    """hidden_states of idx (B, T): prefill `prefill` tokens into an empty cache, then feed `chunk` at a time."""
    cache = model.new_cache(idx.size(0))
    out = [model.hidden_states(idx[:, :prefill], cache)]
    for s in range(prefill, idx.size(1), chunk):
        out.append(model.hidden_states(idx[:, s:s + chunk], cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_one_token_decode_equals_the_uncached_sdpa_path(kv_groups, batch):
    model = tiny(kv_groups)
    idx = torch.randint(0, 100, (batch, 20))
    with torch.no_grad():
        torch.testing.assert_close(cached_features(model, idx, prefill=5, chunk=1), model.hidden_states(idx),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, GROUPED_MAX_T, GROUPED_MAX_T + 3])  # grouped form, and SDPA with a mask
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_a_chunk_against_the_cache_is_causal_inside_the_chunk(kv_groups, chunk):
    model = tiny(kv_groups)
    idx = torch.randint(0, 100, (3, 5 + 2 * chunk))
    with torch.no_grad():
        torch.testing.assert_close(cached_features(model, idx, prefill=5, chunk=chunk), model.hidden_states(idx),
                                   atol=1e-5, rtol=1e-5)


def test_grouped_attention_equals_sdpa_with_expanded_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    mask = torch.ones(3, 11, dtype=torch.bool).tril_(8)  # the 3 queries are positions 8, 9, 10
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
    torch.testing.assert_close(grouped_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_bf16_decode_stays_close_to_fp32():
    fp32, bf16 = tiny(1), tiny(1, dtype=torch.bfloat16)
    idx = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        a = cached_features(fp32, idx, prefill=4, chunk=1)
        b = cached_features(bf16, idx, prefill=4, chunk=1)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


def cache_buffers(B, G, max_len, length, hd, dtype):
    """(B, G, max_len, hd) key/value buffers whose positions from `length` on hold large stale values."""
    torch.manual_seed(1)
    k, v = torch.randn(B, G, max_len, hd), torch.randn(B, G, max_len, hd)
    k[:, :, length:] *= 100
    v[:, :, length:] += 1000
    return k.to(dtype), v.to(dtype)


def reference_attention(q, k, v, length):
    """SDPA of the T new queries (the last T of `length` positions) against K/V expanded to n_head heads, in fp32."""
    T, R = q.size(2), q.size(1) // k.size(1)
    k, v = (t[:, :, :length].float().repeat_interleave(R, 1) for t in (k, v))
    mask = torch.ones(T, length, dtype=torch.bool).tril_(length - T)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


class Ops(TorchDispatchMode):
    """Records every aten op's name, the shapes of what it returns and the dtypes of its tensor inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        self.calls.append((func.__name__, shapes, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return out

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_decode_attention_reads_only_the_filled_positions_of_the_cache(kv_groups, T):
    B, nh, hd, length = 2, 4, 8, 21
    k, v = cache_buffers(B, kv_groups, 40, length, hd, torch.float32)
    q = torch.randn(B, nh, T, hd)
    torch.testing.assert_close(decode_attention(q, k, v, length), reference_attention(q, k, v, length),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_bf16_decode_over_a_large_cache_reads_whole_key_buckets_and_masks_the_padding(kv_groups, monkeypatch):
    # A new key length per step would make oneDNN build a new bf16 matmul for every step: lengths are bucketed.
    monkeypatch.setattr(attention, "FP32_CAST_MAX_ELEMENTS", 0)  # every cache counts as large: the bf16 grouped form
    B, nh, hd, length = 3, 4, 8, 2 * KEY_BUCKET + 5
    k, v = cache_buffers(B, kv_groups, 4 * KEY_BUCKET, length, hd, torch.bfloat16)
    q = torch.randn(B, nh, 1, hd).bfloat16()
    with Ops() as ops:
        y = decode_attention(q, k, v, length)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference_attention(q, k, v, length), atol=2e-2, rtol=2e-2)
    products = [(shapes[0], dtypes) for name, shapes, dtypes in ops.calls if name.startswith(("bmm", "mm"))]
    scores = [shape for shape, _ in products if shape[-1] != hd]
    assert scores and all(s[-1] == -(-length // KEY_BUCKET) * KEY_BUCKET for s in scores)
    assert all(dtypes == {torch.bfloat16} for _, dtypes in products)  # no fp32 copy of a large cache


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_bf16_decode_over_a_small_cache_runs_in_fp32_on_copies_of_the_g_filled_heads(kv_groups, T):
    B, nh, hd, length = 3, 4, 8, 21
    assert B * kv_groups * length * hd <= FP32_CAST_MAX_ELEMENTS
    k, v = cache_buffers(B, kv_groups, 64, length, hd, torch.bfloat16)
    q = torch.randn(B, nh, T, hd).bfloat16()
    with Ops() as ops:
        y = decode_attention(q, k, v, length)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference_attention(q, k, v, length), atol=2e-2, rtol=2e-2)
    casts = [shapes[0] for name, shapes, dtypes in ops.calls if name.startswith("_to_copy") and dtypes == {torch.bfloat16}]
    assert [c for c in casts if c[2:] == (length, hd)] == [(B, kv_groups, length, hd)] * 2  # K, V: G filled heads
    kernels = [dtypes for name, _, dtypes in ops.calls if name.startswith(("bmm", "mm", "_scaled_dot_product"))]
    assert kernels and all(dtypes == {torch.float32} for dtypes in kernels)


@pytest.mark.parametrize("batch, kv_groups, sdpa", [(1, 4, True), (3, 4, True), (1, 2, True), (1, 1, True),
                                                     (3, 2, False), (3, 1, False)])
def test_one_token_fp32_decode_takes_sdpa_at_batch_1_or_for_mha_and_the_grouped_form_otherwise(batch, kv_groups,
                                                                                                sdpa):
    k, v = cache_buffers(batch, kv_groups, 64, 21, 8, torch.float32)
    q = torch.randn(batch, 4, 1, 8)
    with Ops() as ops:
        y = decode_attention(q, k, v, 21)
    took_sdpa = any("scaled_dot_product" in n for n in ops.names())
    assert took_sdpa == sdpa and any(n.startswith("bmm") for n in ops.names()) != sdpa
    if kv_groups < 4:  # no K/V with n_head heads
        assert (batch, 4, 21, 8) not in [shape for _, returned, _ in ops.calls for shape in returned]
    torch.testing.assert_close(y, reference_attention(q, k, v, 21), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_groups", [2, 1], ids=["gqa", "mqa"])
def test_decode_step_never_expands_kv_to_query_heads_and_the_cache_keeps_g_heads(kv_groups):
    model = tiny(kv_groups)
    cache = model.new_cache(3)
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 100, (3, 12)), cache)
        with Ops() as ops:
            model.hidden_states(torch.randint(0, 100, (3, 1)), cache)
    shapes = [shape for _, returned, _ in ops.calls for shape in returned]
    hd = 8
    assert (3, 4, 13, hd) not in shapes and (3, 4, 32, hd) not in shapes  # no K/V with n_head heads
    assert all(k.shape == (3, kv_groups, 32, hd) for k in cache.k + cache.v)
    assert cache.length == 13


def test_expand_kv_when_gqa_would_take_a_slower_backend():
    assert expand_kv_for_speed("math", "flash_attention")  # e.g. fp32 GQA on CUDA
    assert expand_kv_for_speed("efficient_attention", "flash_attention")  # flash refusing enable_gqa
    assert not expand_kv_for_speed("flash_attention", "flash_attention")  # the CPU, or flash taking GQA
    assert not expand_kv_for_speed("efficient_attention", "efficient_attention")
    assert not expand_kv_for_speed("math", "math")


def test_choose_sdpa_path_asks_for_gqa_and_the_same_shape_as_mha():
    asked = []

    def probe(q, k, v, dropout_p, is_causal, enable_gqa):
        asked.append((k.size(1), enable_gqa))
        return "math" if enable_gqa else "flash_attention"

    q, k = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16)
    expand, label = choose_sdpa_path(q, k, k, 0.0, True, probe=probe)
    assert asked == [(2, True), (8, False)]
    assert expand and label == "flash_attention (K/V expanded; enable_gqa would take math)"


def test_attention_expands_kv_where_the_probe_says_so_with_the_same_output(monkeypatch):
    import gpt_lightning.model.attention as attention

    model = tiny(2).train()
    x = torch.randint(0, 100, (2, 16))
    native = model.hidden_states(x)
    assert model.transformer.h[0].attn.sdpa_path == "flash_attention (enable_gqa)"  # this CPU's answer

    slow_gqa = lambda q, k, v, p, c, enable_gqa: "math" if enable_gqa else "flash_attention"  # noqa: E731
    monkeypatch.setattr(attention, "sdpa_backend", slow_gqa)
    fresh = tiny(2).train()
    expanded = fresh.hidden_states(x)
    attn = fresh.transformer.h[0].attn
    assert attn.sdpa_path.startswith("flash_attention (K/V expanded")
    assert attn.sdpa_paths[("cpu", torch.float32, False)][0] is True
    torch.testing.assert_close(expanded, native, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["onednn", "transposed"])
@pytest.mark.parametrize("rows", [1, 8, 32, 64])
def test_decode_linear_layouts_compute_f_linear_at_every_decode_batch(layout, rows):
    from gpt_lightning.model.sampling import cpu_matvec_layout

    model = tiny(2, vocab_size=300)
    x = torch.randn(rows, 32)
    with torch.no_grad():
        ref = [model.lm_head(x), model.transformer.h[0].attn.c_attn(x[:, None])]
        with cpu_matvec_layout(model, rows=rows, layout=layout):
            got = [model.lm_head(x), model.transformer.h[0].attn.c_attn(x[:, None])]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert "forward" not in model.lm_head.__dict__  # the layout is gone after the context


def attention_inputs(G, dtype, B=2, nh=4, T=16, hd=8, seed=0):
    """q (B, nh, T, hd) as the model makes it (a transposed view), k, v (B, G, T, hd), and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, nh, hd, generator=g, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(B, G, T, hd, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(B, nh, T, hd, generator=g, dtype=torch.float64)


def attention_and_grads(fn, q, k, v, dy, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    y.backward(dy.to(dtype))
    return [y.double()] + [t.grad.double() for t in leaves]


def sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_matmul_attention_equals_sdpa_in_value_and_gradients(kv_groups):
    q, k, v, dy = attention_inputs(kv_groups, torch.float64)
    exact = attention_and_grads(sdpa_causal, q, k, v, dy, torch.float64)
    for got, want in zip(attention_and_grads(matmul_attention, q, k, v, dy, torch.float32), exact):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # bf16: no further from the exact result than SDPA's own bf16 kernel (plus one bf16 step of slack)
    ours = attention_and_grads(matmul_attention, q, k, v, dy, torch.bfloat16)
    theirs = attention_and_grads(sdpa_causal, q, k, v, dy, torch.bfloat16)
    for a, b, want in zip(ours, theirs, exact):
        assert (a - want).abs().max() <= 2 * (b - want).abs().max() + 2 ** -8 * want.abs().max()


@pytest.mark.parametrize("kv_groups", [2, 1], ids=["gqa", "mqa"])
def test_matmul_attention_never_expands_kv_to_query_heads(kv_groups):
    q, k, v, dy = (t.to(torch.bfloat16).contiguous() for t in attention_inputs(kv_groups, torch.float64))
    q, k, v = (t.requires_grad_() for t in (q, k, v))  # q contiguous here: no copy of it to lay out
    with Ops() as ops:
        matmul_attention(q, k, v).backward(dy)
    assert k.grad.shape == v.grad.shape == (2, kv_groups, 16, 8) and q.grad.shape == (2, 4, 16, 8)
    made = [shape for name, returned, _ in ops.calls if not name.startswith(("view", "_unsafe_view", "transpose", "detach"))
            for shape in returned]
    assert made and (2, 4, 16, 8) not in made  # nothing with n_head heads is built: no K/V expanded to them


def test_matmul_attention_refuses_a_double_backward_instead_of_answering_wrongly():
    q, k, v, _ = (t.float().requires_grad_() for t in attention_inputs(2, torch.float64))
    (dq,) = torch.autograd.grad(matmul_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_cpu_training_takes_matmul_attention_in_bf16_up_to_its_length_and_sdpa_otherwise(monkeypatch):
    x = torch.randint(0, 100, (2, 16))

    def path(model, autocast=True, grad=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
            model.hidden_states(x)
        return model.transformer.h[0].attn.sdpa_path

    assert path(tiny(2).train()).startswith("matmul softmax (CPU bfloat16")
    assert path(tiny(2).train(), autocast=False) == "flash_attention (enable_gqa)"  # fp32: even, SDPA stays
    assert path(tiny(2).eval(), grad=False) == "flash_attention (enable_gqa)"  # inference prefill: SDPA
    assert path(tiny(2, dropout=0.1).train()) == "math (enable_gqa)"  # attention dropout: SDPA's (math on CPU)
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_T", 8)
    assert path(tiny(2).train()) == "flash_attention (enable_gqa)"  # longer than MATMUL_ATTENTION_MAX_T


def test_bf16_training_step_with_matmul_attention_matches_sdpa(monkeypatch):
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))

    def loss_and_grads():
        model = tiny(2).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss, grads = loss_and_grads()
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_T", 0)  # SDPA everywhere
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-3 + 0.05 * r.abs().max().item(), rtol=0.05)
