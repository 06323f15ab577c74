"""The SDPA backend probe the GPU check uses (gpt_lightning/measure/sdpa_backends.py), on the CPU: which backends
accept GQA inputs alone, which one the profiler saw run, and the speed-tier comparison behind "GQA never takes a
slower backend than MHA"."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt_lightning.measure.sdpa_backends import (BACKENDS, accepted_backends, backend_of_op, backends_that_ran,
                                                 fastest, sdpa_inputs, slower_than, slowest,
                                                 try_backend)
from gpt_lightning.model import GPT, GPTConfig


@pytest.mark.parametrize("op, backend", [
    ("aten::_scaled_dot_product_flash_attention", "flash"),
    ("aten::_scaled_dot_product_flash_attention_backward", "flash"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash"),
    ("aten::_scaled_dot_product_efficient_attention", "efficient"),
    ("aten::_scaled_dot_product_efficient_attention_backward", "efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", "cudnn"),
    ("aten::_scaled_dot_product_cudnn_attention_backward", "cudnn"),
    ("aten::_scaled_dot_product_attention_math", "math"),
    ("aten::_scaled_dot_product_fused_attention_overrideable", "other"),
    ("aten::scaled_dot_product_attention", None),  # the entry point, not a backend
    ("aten::mm", None),
])
def test_aten_op_names_map_to_backends(op, backend):
    assert backend_of_op(op) == backend


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_on_a_cpu_flash_and_math_accept_and_the_cuda_kernels_refuse(kv_heads):
    q, k, v = sdpa_inputs(2, 4, kv_heads, 32, 16, torch.float32, "cpu")
    accepted = accepted_backends(q, k, v)
    assert set(accepted) == set(BACKENDS)
    assert accepted["flash"] is None and accepted["math"] is None
    assert accepted["efficient"] and accepted["cudnn"]  # a reason string, not None


def test_a_refusal_leaves_no_gradients_behind():
    q, k, v = sdpa_inputs(1, 4, 2, 16, 8, torch.float32, "cpu")
    assert try_backend("math", q, k, v) is None
    assert q.grad is None and k.grad is None


def test_profiler_sees_the_backend_that_ran():
    q, k, v = sdpa_inputs(1, 4, 2, 16, 8, torch.float32, "cpu")

    def run(backend):
        def step():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        return step

    assert backends_that_ran(run(SDPBackend.MATH)) == ["math"]
    assert backends_that_ran(run(SDPBackend.FLASH_ATTENTION)) == ["flash"]


def test_profiler_sees_the_backend_of_a_gqa_model_training_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_kv_groups=2, n_embd=32))
    x = torch.randint(0, 64, (2, 16))
    ran = backends_that_ran(lambda: model(x, x).backward())
    assert len(ran) == 1 and ran[0] in BACKENDS  # exactly one backend served every layer, forward and backward


def test_speed_tiers():
    assert fastest(["math", "efficient", "flash"]) == "flash"
    assert slowest(["flash", "math"]) == "math" and slowest(["cudnn"]) == "cudnn"
    assert fastest([]) is None and slowest([]) is None
    assert slower_than("math", "flash") and slower_than("efficient", "cudnn")
    assert not slower_than("cudnn", "flash") and not slower_than("flash", "efficient")
    assert not slower_than(None, "flash")
