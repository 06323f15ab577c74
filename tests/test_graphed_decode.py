"""The fixed-shape decode step a CUDA graph replays (`GPT.static_next_logits`, `GraphedDecoder`), checked on the CPU
against the eager `next_logits`; the capture itself is checked by the CUDA twins in tests/test_gpu_inference.py."""

import functools

import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.attention import masked_decode_attention
from gpt_lightning.model.graphed_decode import GraphedDecoder, decode_step
from gpt_lightning.model.sampling import decode

ATTENTIONS = {"mha": 4, "gqa": 2, "mqa": 1}  # kv_groups at 4 heads


def tiny(kv_groups=2, **kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=kv_groups, n_embd=32) | kw
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():  # LayerNorms off their initial 1 and 0, so a swapped norm would show
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.5), m.bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("kv_groups", [8, 2, 1])
def test_masked_decode_attention_equals_attention_over_the_filled_positions(kv_groups):
    torch.manual_seed(0)
    B, nh, hd, max_len, pos = 3, 8, 16, 24, 13
    q = torch.randn(B, nh, 1, hd)
    k, v = torch.randn(B, kv_groups, max_len, hd), torch.randn(B, kv_groups, max_len, hd)
    k[:, :, pos + 1:], v[:, :, pos + 1:] = 1e4, -1e4  # stale slots past pos: any leak would show
    r = nh // kv_groups  # query heads per KV head: head i reads KV head i // r
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :pos + 1].repeat_interleave(r, 1), v[:, :, :pos + 1].repeat_interleave(r, 1))
    got = masked_decode_attention(q, k, v, torch.tensor([pos]))
    assert got.shape == (B, nh, 1, hd)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_static_decode_step_equals_next_logits(kv_groups, batch):
    model = tiny(kv_groups)
    prompt = torch.randint(0, 100, (batch, 4))
    eager, static = model.new_cache(batch), model.new_cache(batch)
    with torch.no_grad():
        model.last_logits(prompt, eager), model.last_logits(prompt, static)
        step = GraphedDecoder(model, static, graph=False)  # the graph's step, run eagerly
        tokens = torch.randint(0, 100, (batch,))
        for _ in range(16 - 4):  # up to block_size
            want, got = model.next_logits(tokens, eager), step(tokens)
            assert got.shape == (batch, 100)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert static.length == eager.length
            tokens = want.argmax(-1)
        for k, k_ref in zip(static.k + static.v, eager.k + eager.v):
            assert k.shape == (batch, kv_groups, 16, 8)  # the cache keeps its G heads
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)  # layer 2's inputs went through attention
        with pytest.raises(ValueError, match="17 tokens exceeds the cache's 16 positions"):
            step(tokens)
    assert static.length == 16  # the refused step wrote nothing and did not advance


def test_static_decode_step_stays_close_in_bf16():
    fp32, bf16 = tiny(2), tiny(2).to(torch.bfloat16)
    prompt, tokens = torch.randint(0, 100, (2, 6)), torch.randint(0, 100, (2,))
    a, b = fp32.new_cache(2), bf16.new_cache(2)
    with torch.no_grad():
        fp32.last_logits(prompt, a), bf16.last_logits(prompt, b)
        got = GraphedDecoder(bf16, b, graph=False)(tokens)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), fp32.next_logits(tokens, a), atol=0.05, rtol=0.05)


def test_decoder_on_an_empty_cache_prefills_as_next_logits_does():
    model = tiny(2)
    tokens = torch.randint(0, 100, (2,))
    a, b = model.new_cache(2), model.new_cache(2)
    with torch.no_grad():
        torch.testing.assert_close(GraphedDecoder(model, a, graph=False)(tokens), model.next_logits(tokens, b))
    assert a.length == b.length == 1


def test_decoder_stops_at_a_cache_shorter_than_block_size():
    model = tiny(2)
    cache = model.new_cache(1)
    cache.max_len = 6  # as the decode grid's caches: context + new tokens, fewer than block_size
    with torch.no_grad():
        model.last_logits(torch.randint(0, 100, (1, 5)), cache)
        step = GraphedDecoder(model, cache, graph=False)
        step(torch.tensor([1]))
        with pytest.raises(ValueError, match="7 tokens exceeds the cache's 6 positions"):
            step(torch.tensor([2]))


def test_decode_step_is_the_eager_next_logits_on_a_cpu():
    model = tiny(2)
    cache = model.new_cache(1)
    step = decode_step(model, cache)
    assert isinstance(step, functools.partial) and step.func == model.next_logits
    assert step.keywords == {"cache": cache}


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_generate_takes_the_cuda_graph_flag_and_decodes_the_same_on_a_cpu(cuda_graph):
    model = tiny(1)
    prompt = torch.randint(0, 100, (2, 5))
    want = decode(model, prompt, 30, temperature=0)  # past block_size=16: the cache is rebuilt
    assert torch.equal(model.generate(prompt, 30, temperature=0, cuda_graph=cuda_graph), want)
