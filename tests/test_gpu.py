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
