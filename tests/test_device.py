"""What `precision: auto` resolves to, and the CPU allocator setting."""

import pytest
import torch

from gpt_lightning.common import device


@pytest.mark.parametrize("cuda, bf16_gpu, cpu_bf16, accelerator, expected", [
    (True, True, False, "auto", "bf16-mixed"),
    (True, False, False, "gpu", "16-mixed"),
    (True, True, True, "cpu", "bf16-mixed"),
    (False, False, True, "auto", "bf16-mixed"),
    (False, False, False, "auto", "32-true"),
    (False, False, False, "cpu", "32-true"),
])
def test_auto_precision(monkeypatch, cuda, bf16_gpu, cpu_bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: cpu_bf16)
    assert device.resolve_precision("auto", accelerator) == expected


def test_explicit_precision_is_kept():
    assert device.resolve_precision("32-true", "auto") == "32-true"
    assert device.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_bf16_autocast_loss_agrees_with_fp32_at_step_0():
    from gpt_lightning.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_groups=2, n_embd=64))
    x, y = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    fp32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, y)
    assert bf16.dtype == torch.float32  # the loss is computed in fp32 from bf16 logits
    assert abs(bf16.item() - fp32.item()) < 0.02
