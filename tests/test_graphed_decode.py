"""The fixed-shape decode step a CUDA graph replays (`GPT.static_next_logits`, `GraphedDecoder`), checked on the CPU
against the eager `next_logits`; the capture itself is checked by the CUDA twins in tests/test_gpu_inference.py."""

import functools
import gc
import weakref

import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig, KVCache, graphed_decode
from gpt_lightning.model.attention import masked_decode_attention
from gpt_lightning.model.graphed_decode import GraphedDecoder, bucket_starts, decode_step, key_bucket, shared_decoder
from gpt_lightning.model.sampling import _decode_steps, decode

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


def test_key_buckets_are_powers_of_two_from_the_minimum_up_to_the_cache():
    assert [key_bucket(n, 160) for n in (1, 64, 65, 128, 129, 160)] == [64, 64, 128, 128, 160, 160]
    assert key_bucket(5, 16) == 16  # a cache shorter than the smallest bucket: the whole cache
    assert key_bucket(1000, 1024) == 1024 and key_bucket(513, 2048) == 1024


def test_bucket_starts_are_the_first_cache_length_of_every_bucket_the_steps_reach():
    # cache lengths 32..159 before each step: keys 33..160, buckets 64 (from length 32), 128 (64), 160 (128)
    assert bucket_starts(32, 128, 160) == [32, 64, 128]
    assert bucket_starts(992, 32, 1024) == [992]  # the grid's longest cell: one bucket
    assert bucket_starts(100, 200, 160) == [100, 128]  # steps stop at the cache's end


def test_masked_decode_attention_takes_the_strided_output_of_cuda_kernels(monkeypatch):
    """CUDA's fused SDPA kernels return (B, G, R, hd) laid out as (B, R, G, hd); a view cannot merge G and R then."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)  # GQA: G = 2, R = 4
    want = masked_decode_attention(q, k, v, torch.tensor([7]))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(masked_decode_attention(q, k, v, torch.tensor([7])), want, atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_static_decode_step_equals_next_logits(kv_groups, batch):
    model = tiny(kv_groups, block_size=160)  # key buckets 64, 128 and 160 (the whole cache)
    prompt = torch.randint(0, 100, (batch, 4))
    eager, static = model.new_cache(batch), model.new_cache(batch)
    with torch.no_grad():
        model.last_logits(prompt, eager), model.last_logits(prompt, static)
        step = GraphedDecoder(model, static, graph=False)  # the graphs' bucketed step, run eagerly
        tokens = torch.randint(0, 100, (batch,))
        for _ in range(160 - 4):  # up to block_size, through every bucket
            want, got = model.next_logits(tokens, eager), step(tokens)
            assert got.shape == (batch, 100)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert static.length == eager.length
            tokens = want.argmax(-1)
        for k, k_ref in zip(static.k + static.v, eager.k + eager.v):
            assert k.shape == (batch, kv_groups, 160, 8)  # the cache keeps its G heads
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)  # layer 2's inputs went through attention
        with pytest.raises(ValueError, match="161 tokens exceeds the cache's 160 positions"):
            step(tokens)
    assert static.length == 160  # the refused step wrote nothing and did not advance


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


def test_decoder_over_a_cache_shorter_than_block_size_decodes_to_its_end():
    model = tiny(2)
    c = model.config
    # as the decode grid's caches: context + new tokens, fewer than block_size
    short = KVCache(c.n_layer, 2, c.n_kv_groups, 7, c.head_dim)
    full = model.new_cache(2)
    prompt = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        model.last_logits(prompt, short), model.last_logits(prompt, full)
        step = GraphedDecoder(model, short, graph=False)
        for token in (1, 2):
            tokens = torch.tensor([token, token + 1])
            torch.testing.assert_close(step(tokens), model.next_logits(tokens, full), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="8 tokens exceeds the cache's 7 positions"):
            step(torch.tensor([3, 4]))


def test_a_failed_capture_warns_once_and_every_later_step_is_next_logits(monkeypatch):
    model = tiny(2)
    prompt = torch.randint(0, 100, (2, 4))
    ours, ref = model.new_cache(2), model.new_cache(2)
    failures = []
    monkeypatch.setattr(graphed_decode, "capture_failures", failures)
    watch = graphed_decode.GraphWatch(True, torch.device("cuda"))  # what the bench and evaluate report from
    assert watch.ran() and not graphed_decode.GraphWatch(True, torch.device("cpu")).ran()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    step = GraphedDecoder(model, ours)
    step.use_graph = True  # as on a GPU, whose capture then fails

    def broken_capture(keys):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(step, "_capture", broken_capture)
    monkeypatch.setattr(step, "_step", lambda view: pytest.fail("the fixed-shape step ran after the failure"))
    with torch.no_grad():
        model.last_logits(prompt, ours), model.last_logits(prompt, ref)
        tokens = torch.tensor([5, 6])
        with pytest.warns(RuntimeWarning, match="capture of the decode step failed .operation not permitted"):
            torch.testing.assert_close(step(tokens), model.next_logits(tokens, ref))
        for _ in range(3):  # no retry, no second warning: eager next_logits
            torch.testing.assert_close(step(tokens), model.next_logits(tokens, ref))
    assert failures == ["operation not permitted when stream is capturing"]
    assert watch.failures() == failures and not watch.ran()
    assert step.failed and not step.graphed and ours.length == ref.length == 8


def test_graphs_are_captured_afresh_after_the_weights_moved_and_refused_off_the_caches_dtype(monkeypatch):
    model, other = tiny(2), tiny(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    prompt, tokens = torch.randint(0, 100, (2, 4)), torch.tensor([5, 6])
    ours, ref = model.new_cache(2), model.new_cache(2)
    step = GraphedDecoder(model, ours)
    step.use_graph = True  # as on a GPU; a graph here is the fixed-shape step, replayed on the current weights
    captures = []

    class Replayed:
        def __init__(self, keys):
            self.view, self.logits = ours.prefix(keys), step._step(ours.prefix(keys))

        def replay(self):
            self.logits.copy_(step._step(self.view))

    def capture(keys):
        captures.append(keys)
        graph = Replayed(keys)
        return graph, graph.logits
    monkeypatch.setattr(step, "_capture", capture)
    with torch.no_grad():
        model.last_logits(prompt, ours), model.last_logits(prompt, ref)
        for _ in range(2):
            torch.testing.assert_close(step(tokens), model.next_logits(tokens, ref))
        assert captures == [16]  # block_size 16: one bucket, the whole cache
        # new tensors for every weight: graphs captured before would read the old (freed) memory
        model.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(step(tokens), model.next_logits(tokens, ref))
        assert len(captures) == 2 and step.fingerprint == graphed_decode.weights_fingerprint(model)
        step(tokens), model.next_logits(tokens, ref)  # the new graph replays: no third capture
        assert len(captures) == 2
        model.double()
        with pytest.raises(ValueError, match="weights moved to cpu torch.float64 while this decoder's cache is cpu "
                                             "torch.float32"):
            step(tokens)


def test_under_deterministic_algorithms_decode_is_eager_and_not_reported_as_graphed(monkeypatch):
    model = tiny(2)
    prompt, tokens = torch.randint(0, 100, (2, 4)), torch.tensor([5, 6])
    ours, ref = model.new_cache(2), model.new_cache(2)
    step = GraphedDecoder(model, ours)
    step.use_graph = True  # as on a GPU
    monkeypatch.setattr(step, "_capture", lambda keys: pytest.fail("a capture under deterministic algorithms"))
    monkeypatch.setattr(step, "_step", lambda view: pytest.fail("the bucketed step under deterministic algorithms"))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not graphed_decode.GraphWatch(True, torch.device("cuda")).ran()  # was True: nothing failed
    with torch.no_grad():
        model.last_logits(prompt, ours), model.last_logits(prompt, ref)
        for _ in range(3):
            torch.testing.assert_close(step(tokens), model.next_logits(tokens, ref))
    assert ours.length == ref.length == 7


def test_shared_decoder_is_kept_per_model_and_rebuilt_when_it_cannot_serve():
    model = tiny(2)
    with shared_decoder(model, 2) as first:
        first.cache.length = 5  # a decode left it filled, with a stale NaN past what the next decode fills
        first.cache.v[1][0, 0, 9] = float("nan")
    with shared_decoder(model, 2) as again:
        assert again is first and again.cache.length == 0  # kept, emptied for the next decode
        assert all(not t.any() for t in again.cache.k + again.cache.v)  # and zeroed: a bucket reads past the fill
        with shared_decoder(model, 2) as nested:  # a second decode running meanwhile: a cache of its own
            assert nested is not first
    with shared_decoder(model, 2) as kept:
        assert kept is first  # the nested one was not kept in its place
    with shared_decoder(model, 3) as other:
        assert other is not first and other.cache.k[0].size(0) == 3
    with shared_decoder(model, 2) as rebuilt:
        assert rebuilt is not first  # only the last batch size's cache is kept
    model.to(torch.bfloat16)  # the weights moved: graphs captured on the old ones would read freed memory
    with shared_decoder(model, 2) as moved:
        assert moved is not rebuilt and moved.cache.k[0].dtype == torch.bfloat16


def test_a_shared_decoder_made_in_inference_mode_decodes_outside_it():
    """The training callback samples inside validation's inference mode; the end-of-run decode timing runs outside."""
    model = tiny(2)
    prompt = torch.randint(0, 100, (1, 4))
    with torch.inference_mode(), shared_decoder(model, 1) as step:
        list(_decode_steps(model, prompt, 4, 0.0, None, None, None, step.cache, step))
    with torch.no_grad(), shared_decoder(model, 1) as again:
        assert again is step
        tokens = list(_decode_steps(model, prompt, 4, 0.0, None, None, None, again.cache, again))
    assert torch.equal(torch.cat(tokens), decode(model, prompt, 4, temperature=0)[0, 4:])


@pytest.mark.parametrize("kv_groups", ATTENTIONS.values(), ids=ATTENTIONS.keys())
def test_the_shared_decoders_loop_decodes_as_eager_past_block_size(kv_groups):
    """The branch stream_tokens takes on a GPU, run here with the fixed-shape steps eager: buckets 64 and 80, then
    the re-prefill once the context fills block_size."""
    model = tiny(kv_groups, block_size=80)
    prompt = torch.randint(0, 100, (2, 30))
    with torch.no_grad(), shared_decoder(model, 2) as step:
        tokens = list(_decode_steps(model, prompt, 90, 0.0, None, None, None, step.cache, step))
    assert torch.equal(torch.stack(tokens, 1), decode(model, prompt, 90, temperature=0)[:, 30:])


def test_a_step_of_another_batch_size_is_refused():
    model = tiny(2)
    cache = model.new_cache(2)
    with torch.no_grad():
        model.last_logits(torch.randint(0, 100, (2, 3)), cache)
        with pytest.raises(ValueError, match=r"tokens of shape \(3,\) for a cache of batch 2"):
            GraphedDecoder(model, cache, graph=False)(torch.tensor([1, 2, 3]))


def test_shared_decoders_do_not_keep_their_model_alive():
    model = tiny(2)
    with shared_decoder(model, 1):
        pass
    assert len(graphed_decode._shared) >= 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


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
