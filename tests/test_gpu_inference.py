"""CUDA twins of the inference tests (issue 11): grouped decode, the fused LM-head loss, the SDPA path choice.
Run by `bash tests/gpu/check.sh` on a GPU machine (`pytest -m gpu`); skipped where there is no CUDA."""

import contextlib
import warnings

import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash tests/gpu/check.sh)")]


def tiny(kv=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=8, n_kv_groups=kv, n_embd=128)).cuda()


@pytest.mark.parametrize("kv", [8, 2, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_decode_equals_the_uncached_path_on_cuda(kv, batch):
    model = tiny(kv).eval()
    idx = torch.randint(0, 1000, (batch, 24), device="cuda")
    with torch.no_grad():
        cache = model.new_cache(batch)
        steps = [model.hidden_states(idx[:, :8], cache)] + [model.hidden_states(idx[:, i:i + 1], cache)
                                                             for i in range(8, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), model.hidden_states(idx), atol=1e-5, rtol=1e-5)
    assert all(k.shape == (batch, kv, 64, 16) for k in cache.k + cache.v)


def test_grouped_decode_in_bf16_stays_close_on_cuda():
    fp32 = tiny(2).eval()
    bf16 = tiny(2).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 1000, (2, 8), device="cuda")
    with torch.no_grad():
        a, b = fp32.new_cache(2), bf16.new_cache(2)
        fp32.hidden_states(prompt, a), bf16.hidden_states(prompt, b)
        nxt = prompt[:, -1:]
        torch.testing.assert_close(bf16.hidden_states(nxt, b).float(), fp32.hidden_states(nxt, a), atol=0.1, rtol=0.05)


def test_fused_lm_head_loss_equals_cross_entropy_on_cuda():
    from gpt_lightning.model.loss import lm_head_loss

    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1024, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda")
    loss = lm_head_loss(h, w, t, 1000, chunk_rows=64)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w)[:, :1000], t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    for a, b in ((loss, ref), (gh, rh), (gw, rw)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_16_bit_weight_gradient_takes_fp32_output_gemms_on_cuda(dtype):
    from gpt_lightning.model.loss import fp32_product_available, lm_head_loss

    torch.manual_seed(0)
    h = torch.randn(2048, 64, device="cuda", requires_grad=True)
    w = (torch.randn(4096, 64, device="cuda") * 0.1).requires_grad_()
    t = torch.randint(0, 50, (2048,), device="cuda")  # rare rows get only the softmax's small share
    assert fp32_product_available(h.to(dtype))  # aten::mm.dtype: tensor cores, fp32 out (not fp32 GEMMs)
    with torch.autocast("cuda", dtype=dtype):
        loss = lm_head_loss(h, w, t, 4096, chunk_rows=128)  # 16 chunks, each summed in fp32
    g = torch.autograd.grad(loss, w)[0]
    exact = torch.autograd.grad(torch.nn.functional.cross_entropy(h.double() @ w.double().t(), t), w)[0]
    assert (g[50:] != 0).all()
    rel = ((g.double() - exact).norm() / exact.norm()).item()
    assert rel < 2e-2, rel  # the inputs' 16-bit rounding, not a sum of 16 rounded products
    # The blocks' products themselves: fp32 sums of the 16-bit inputs (a 16-bit product would be off by ~2e-3)
    from gpt_lightning.model.loss import add_weight_gradient_in_blocks

    g16, h16 = torch.randn(512, 4096, device="cuda").to(dtype), torch.randn(512, 64, device="cuda").to(dtype)
    grad_w = torch.zeros(4096, 64, device="cuda")
    add_weight_gradient_in_blocks(grad_w, g16, h16, 0.5)
    want = 0.5 * g16.double().t() @ h16.double()  # fp64: no TF32, whatever the matmul precision setting
    torch.testing.assert_close(grad_w.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_training_never_takes_a_slower_sdpa_backend_than_mha(dtype):
    from gpt_lightning.model.attention import BACKEND_RANK, sdpa_backend

    model = tiny(2).train()
    x = torch.randint(0, 1000, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(x, torch.roll(x, -1, 1))
    path = model.transformer.h[0].attn.sdpa_path
    q = torch.randn(4, 8, 64, 16, device="cuda", dtype=dtype)
    mha = sdpa_backend(q, q, q, 0.0, True, False)
    print(f"{dtype}: GQA path {path}; MHA gets {mha}")
    assert BACKEND_RANK[path.split()[0]] <= BACKEND_RANK[mha]


@contextlib.contextmanager
def no_capture_failure():
    """A failed or empty graph capture's warnings, as errors: graph tests must not pass on the eager fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture of the decode step failed")
        warnings.filterwarnings("error", message=".*CUDA Graph is empty")
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv", [8, 2, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decode_equals_the_eager_step(kv, batch, dtype):
    from gpt_lightning.model.graphed_decode import GraphedDecoder

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, block_size=200, n_layer=2, n_head=8, n_kv_groups=kv, n_embd=128))
    model = model.cuda().to(dtype).eval()
    prompt = torch.randint(0, 1000, (batch, 8), device="cuda")
    eager, graphed = model.new_cache(batch), model.new_cache(batch)
    with torch.no_grad(), no_capture_failure():
        model.last_logits(prompt, eager), model.last_logits(prompt, graphed)
        step = GraphedDecoder(model, graphed)
        tokens = prompt[:, -1]
        for _ in range(200 - 8):  # to the end of the cache, through the key buckets 64, 128 and 200
            want, got = model.next_logits(tokens, eager), step(tokens).clone()
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
            tokens = want.float().argmax(-1)
    assert step.graphed and sorted(step.graphs) == [64, 128, 200]  # replayed from three graphs, no fallback
    assert graphed.length == eager.length == 200
    torch.use_deterministic_algorithms(True)
    try:
        assert not step.graphed  # under deterministic algorithms steps run eagerly: it must not say it replays
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(k.shape == (batch, kv, 200, 16) for k in graphed.k + graphed.v)


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_generate_with_a_cuda_graph_equals_eager_past_block_size_and_reuses_its_graphs(kv):
    from gpt_lightning.model import graphed_decode

    model = tiny(kv).eval()
    prompt = torch.randint(0, 1000, (2, 40), device="cuda")
    with no_capture_failure():
        graphed = model.generate(prompt, 60, temperature=0)  # 100 > block_size 64: re-prefills into its cache
        decoder = graphed_decode._shared[model][2]
        captured = dict(decoder.graphs)
        again = model.generate(prompt, 60, temperature=0)
    eager = model.generate(prompt, 60, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert decoder.graphed and captured and graphed_decode._shared[model][2] is decoder
    assert decoder.graphs == captured  # the second decode replayed the first one's graphs, capturing none


def test_the_grid_captures_every_graph_before_its_clock_starts(monkeypatch):
    from gpt_lightning.measure.decode_grid import time_decode_at
    from gpt_lightning.model.graphed_decode import GraphedDecoder, bucket_starts

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, block_size=200, n_layer=2, n_head=8, n_kv_groups=2, n_embd=128))
    model = model.cuda().eval()
    events = []
    call, capture = GraphedDecoder.__call__, GraphedDecoder._capture
    monkeypatch.setattr(GraphedDecoder, "__call__", lambda self, t: events.append("step") or call(self, t))
    monkeypatch.setattr(GraphedDecoder, "_capture", lambda self, keys: events.append("capture") or capture(self, keys))
    with no_capture_failure():  # context 40 + 100 steps: buckets 64, 128 and 140 (the cell's whole cache)
        assert time_decode_at(model, 2, 40, 100, torch.Generator().manual_seed(0)) > 0
    warmup = len(bucket_starts(40, 100, 140))
    assert warmup == 3 and events.count("capture") == 3 and events.count("step") == warmup + 100
    first_timed = [i for i, e in enumerate(events) if e == "step"][warmup]
    assert "capture" not in events[first_timed:]  # every capture came in the warm-up
