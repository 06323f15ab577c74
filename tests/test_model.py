"""The GPT: shapes, causality, SDPA GQA against plain attention, KV-cached decoding, refused shapes."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_briefly

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPT, GPTConfig, kv_cache_bytes_per_token
from gpt_lightning.model.sampling import cpu_matvec_layout

ATTENTIONS = {"mha": 4, "gqa": 2, "mqa": 1}  # kv_groups at 4 heads


def tiny(kv_groups=2, **kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=kv_groups, n_embd=32) | kw
    return GPT(GPTConfig(**args)).eval()


def test_logits_shape_and_padded_vocab():
    model = tiny()
    assert model.config.padded_vocab_size == 128
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert model(torch.randint(0, 100, (3, 7))).shape == (3, 7, 100)


def test_kv_projection_holds_kv_groups_heads():
    model = tiny(kv_groups=2)
    # q: 32 features, k and v: 2 heads x 8 dims each
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 16, 32)


def test_residual_projections_are_scaled_at_init():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_kv_groups=4, n_embd=256))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_causality(kv_groups):
    model = tiny(kv_groups)
    x = torch.randint(0, 100, (2, 10))
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 100
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def plain_attention_forward(attn, x):
    """Reference: explicit masked softmax, query head i reads KV head i // (n_head // G)."""
    B, T, C = x.shape
    hd, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_groups
    q, k, v = attn.c_attn(x).split([C, nkv * hd, nkv * hd], dim=2)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    group = torch.arange(nh) // (nh // nkv)
    k, v = k[:, group], v[:, group]  # (B, nh, T, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y)


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_sdpa_matches_plain_attention(kv_groups):
    model = tiny(kv_groups)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), plain_attention_forward(attn, x), atol=1e-5, rtol=1e-5)


def test_query_head_reads_its_contiguous_kv_group():
    """Zero every value head but KV head 1: only query heads 2 and 3 (of 4, G=2) may see non-zero output."""
    model = tiny(kv_groups=2)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        w = attn.c_attn.weight
        w[32 + 16 + 0: 32 + 16 + 8] = 0  # value head 0
        attn.c_attn.bias[32 + 16 + 0: 32 + 16 + 8] = 0
        attn.c_proj.weight.copy_(torch.eye(32))
        attn.c_proj.bias.zero_()
    y = attn(torch.randn(1, 5, 32))  # (1, 5, 4 heads x 8)
    assert torch.all(y[..., :16] == 0)
    assert torch.any(y[..., 16:] != 0)


@pytest.mark.parametrize("batch", [1, 2, 9])  # one row, few rows and prefill-sized rows take different paths
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_greedy_generate_with_cache_equals_without(kv_groups, batch):
    model = tiny(kv_groups)
    prompt = torch.randint(0, 100, (batch, 5))
    cached = model.generate(prompt, 30, temperature=0)  # runs past block_size=16, exercising the crop
    uncached = prompt
    for _ in range(30):
        logits = model(uncached[:, -16:])[:, -1]
        uncached = torch.cat([uncached, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached)


def with_random_norms(model: GPT) -> GPT:
    """Each LayerNorm its own gains and biases: at their initial 1 and 0, swapping ln_1, ln_2 and ln_f goes unseen."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                for p in module.parameters():
                    p.normal_(mean=1.0 if p is module.weight else 0.0, std=0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [{}, {"bias": False, "mlp_hidden": 48}], ids=["gpt2", "no-bias-wide-mlp"])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_next_logits_equals_the_module_path_step_by_step(kv_groups, shape, dtype):
    model = with_random_norms(tiny(kv_groups, **shape)).to(dtype)
    prompt = torch.randint(0, 100, (3, 5))
    ours, ref = model.new_cache(3), model.new_cache(3)
    with torch.no_grad(), cpu_matvec_layout(model, rows=3):  # as decode runs it: the linears' decode layout
        model.hidden_states(prompt, ours), model.hidden_states(prompt, ref)
        tokens = torch.randint(0, 100, (3,))
        for _ in range(16 - 5):  # up to block_size
            got = model.next_logits(tokens, ours)  # (B, vocab)
            want = model.lm_head(model.hidden_states(tokens[:, None], ref)[:, -1])[:, :100]
            assert got.shape == (3, 100) and got.dtype == dtype
            torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same kernels on the same values
            assert ours.length == ref.length
            tokens = got.float().argmax(-1)
        for k, k_ref in zip(ours.k + ours.v, ref.k + ref.v):
            assert k.shape == (3, kv_groups, 16, 8)  # the cache keeps its G heads
            torch.testing.assert_close(k, k_ref, atol=0, rtol=0)
        with pytest.raises(ValueError, match="exceeds block_size=16"):
            model.next_logits(tokens, ours)


@pytest.mark.parametrize("filled", [False, True], ids=["empty-cache", "prefilled-cache"])
def test_next_logits_in_training_mode_applies_dropout_as_the_module_path(filled):
    model = with_random_norms(tiny(2, dropout=0.5))
    prompt, tokens = torch.randint(0, 100, (2, 5)), torch.randint(0, 100, (2,))
    caches = [model.new_cache(2) for _ in range(3)]
    with torch.no_grad():
        if filled:  # the same prefill in every cache
            for cache in caches:
                model.hidden_states(prompt, cache)
        without_dropout = model.next_logits(tokens, caches[2])  # tiny() is in eval mode
        model.train()
        torch.manual_seed(1)
        got = model.next_logits(tokens, caches[0])
        torch.manual_seed(1)
        want = model.lm_head(model.hidden_states(tokens[:, None], caches[1])[:, -1])[:, :100]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, without_dropout)  # dropout did apply


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_kv_cache_holds_kv_groups_heads(kv_groups):
    model = tiny(kv_groups)
    cache = model.new_cache(batch_size=3)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, kv_groups, 16, 8) and cache.v[1].shape == (3, kv_groups, 16, 8)
    assert cache.bytes_per_token == kv_cache_bytes_per_token(2, kv_groups, 8) == 2 * 2 * kv_groups * 8 * 4
    model.hidden_states(torch.randint(0, 100, (3, 4)), cache)
    assert cache.length == 4


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny()
    prompt = torch.randint(0, 100, (1, 3))
    runs = [model.generate(prompt, 12, temperature=1.0, top_k=20, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_top_k_one_is_greedy():
    model = tiny()
    prompt = torch.randint(0, 100, (1, 3))
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), model.generate(prompt, 8, temperature=0))


def test_loss_is_cross_entropy_over_the_real_vocabulary():
    model = tiny()
    x, y = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    with torch.no_grad():  # a padding row that would win every softmax if the loss counted it
        model.transformer.wte.weight[100:] = model.transformer.h[0].ln_1.weight.new_full((32,), 5.0)
    torch.testing.assert_close(model(x, y), F.cross_entropy(model(x).flatten(0, 1), y.flatten()))


@pytest.mark.parametrize("args, message", [
    (dict(n_embd=30, n_head=4, n_kv_groups=2), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_embd=32, n_head=4, n_kv_groups=3), "n_head=4 is not divisible by n_kv_groups=3"),
    (dict(n_embd=32, n_head=4, n_kv_groups=8), "n_head=4 is not divisible by n_kv_groups=8"),
    (dict(n_embd=32, n_head=4, n_kv_groups=0), "n_kv_groups=0 must be a positive integer"),
])
def test_bad_shapes_are_refused_naming_the_values(args, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(vocab_size=100, block_size=16, n_layer=2, **args)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=64))
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.1


def test_bf16_weight_decode_matches_fp32_greedy_on_a_trained_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_groups=2, n_embd=64))
    seq = torch.arange(64) * 7 % 50  # a deterministic cycle the model can learn
    x, y = seq[:-1].view(1, -1)[:, :32], seq[1:].view(1, -1)[:, :32]
    fit_briefly(model, x, y, steps=200)
    model.eval()
    prompt = x[:, :6]
    fp32 = model.generate(prompt, 20, temperature=0)[0, 6:]
    bf16 = GPT(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    assert bf16.new_cache(1).k[0].dtype == torch.bfloat16
    low = bf16.generate(prompt, 20, temperature=0)[0, 6:]
    diverged = (fp32 != low).nonzero()
    assert not len(diverged), f"bf16 greedy decode diverges from fp32 at new token {int(diverged[0])}: " \
                              f"fp32 {fp32.tolist()} vs bf16 {low.tolist()}"


def test_fp16_weights_decode_on_a_cpu_whose_onednn_cannot_pack_them():
    # oneDNN packs fp16 weights only with avx_ne_convert or avx512_fp16; elsewhere decode's layout used to raise
    model = tiny(2).half()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert out.shape == (1, 7) and not model.lm_head.__dict__.get("forward")  # the layout is gone afterwards


def test_decode_layout_falls_back_when_onednn_cannot_take_the_weights_dtype(monkeypatch):
    from gpt_lightning.model import sampling
    monkeypatch.setattr(sampling, "onednn_linear_available", lambda dtype=torch.float32: dtype == torch.float32)
    model = tiny(2).to(torch.bfloat16)  # as on an AVX2-only CPU: no bf16 oneDNN
    packs = []
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: packs.append(a) or a[0])
    cache, ref = model.new_cache(1), model.new_cache(1)
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = [model.last_logits(tokens, ref), model.next_logits(torch.tensor([4]), ref)]
        with cpu_matvec_layout(model, rows=1):
            got = [model.last_logits(tokens, cache), model.next_logits(torch.tensor([4]), cache)]
    assert not packs
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_matches_cross_entropy_value_and_gradient(dtype):
    from gpt_lightning.model import NextTokenLoss

    torch.manual_seed(0)
    logits = torch.randn(64, 320, dtype=dtype, requires_grad=True)  # 300 real tokens, 20 padding columns
    targets = torch.randint(0, 300, (64,))
    ours = NextTokenLoss.apply(logits, targets, 300)
    (g_ours,) = torch.autograd.grad(ours * 3, logits)
    ref = F.cross_entropy(logits[:, :300].float(), targets)
    (g_ref,) = torch.autograd.grad(ref * 3, logits)
    assert torch.all(g_ours[:, 300:] == 0)
    torch.testing.assert_close(ours, ref)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours, g_ref, **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))
