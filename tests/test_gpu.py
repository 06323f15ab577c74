"""CUDA-only checks, run by `bash tests/gpu/check.sh` on a GPU machine (skipped where there is no CUDA)."""

import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash tests/gpu/check.sh)")]


def tiny(kv=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=8, n_kv_groups=kv, n_embd=128)).cuda()


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_bf16_autocast_loss_matches_fp32(kv):
    model = tiny(kv)
    x, y = torch.randint(0, 1000, (4, 64), device="cuda"), torch.randint(0, 1000, (4, 64), device="cuda")
    fp32 = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(x, y)
    assert abs(bf16.item() - fp32.item()) < 0.02


def test_cached_greedy_decode_matches_uncached_on_cuda():
    model = tiny().eval()
    prompt = torch.randint(0, 1000, (2, 8), device="cuda")
    cached = model.generate(prompt, 70, temperature=0)
    uncached = prompt
    with torch.no_grad():
        for _ in range(70):
            uncached = torch.cat([uncached, model(uncached[:, -64:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, uncached)


def test_compiled_model_trains_and_keeps_state_dict_keys():
    model = tiny()
    keys = list(model.state_dict())
    model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 1000, (4, 64), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert list(model.state_dict()) == keys and torch.isfinite(loss)


def test_flash_or_efficient_sdpa_kernel_runs_for_gqa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape


# Issue 11 twins: grouped decode, the fused LM-head loss and the SDPA path choice on CUDA.

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
