"""fp32 CPU matmuls through oneDNN: aten's values to fp32 rounding, gradients included, and only where meant."""

import pytest
import torch
import torch.nn.functional as F

from gpt_lightning.model import cpu_matmul
from gpt_lightning.model.cpu_matmul import Linear, linear, mm, module_linear, takes_onednn
from gpt_lightning.model.cpu_matmul import onednn_linear_available

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear in this torch build")


def close(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() < 1e-5


@needs_onednn
def test_fp32_cpu_products_take_onednn_and_others_keep_aten():
    x = torch.randn(4, 8)
    assert takes_onednn(x, x)
    assert not takes_onednn(x.bfloat16(), x.bfloat16()) and not takes_onednn(x, x.double())


@needs_onednn
def test_linear_and_mm_equal_atens_in_fp32_with_views_and_leading_dims():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 48), torch.randn(32, 48), torch.randn(32)
    assert close(linear(x, w, b), F.linear(x, w, b)) and linear(x, w, b).shape == (3, 5, 32)
    g, a = torch.randn(15, 32), torch.randn(15, 48)
    assert close(mm(g, w), g @ w)  # (N, out) @ (out, in): the weight read transposed
    assert close(mm(g.t(), a), g.t() @ a)  # (out, N) @ (N, in): both operands transposed views
    assert mm(g.bfloat16(), w.bfloat16()).dtype == torch.bfloat16  # bf16 stays on aten


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_the_linear_function_gives_atens_values_and_gradients(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    module = torch.nn.Linear(24, 40, bias=bias)
    out = module_linear(x, module)
    assert type(out.grad_fn).__name__ == "LinearBackward"  # ours, not aten's AddmmBackward
    ref = module(x)
    assert close(out, ref)
    g = torch.randn_like(ref)
    params = [x, *module.parameters()]
    for mine, theirs in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert mine.shape == theirs.shape and close(mine, theirs)


def test_module_linear_is_the_module_without_gradients_under_autocast_or_in_bf16():
    module = torch.nn.Linear(8, 4)
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        module_linear(x, module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module_linear(x, module).dtype == torch.bfloat16
    module_linear(x.bfloat16(), module.bfloat16())
    assert len(calls) == 3


@needs_onednn
def test_an_fp32_training_step_matches_one_on_atens_kernels(monkeypatch):
    from gpt_lightning.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    grads = []
    for onednn in (True, False):
        monkeypatch.setattr(cpu_matmul, "onednn_linear_available", lambda dtype=torch.float32: onednn)
        torch.manual_seed(0)
        model = GPT(config)
        loss = model(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert abs(loss_a - loss_b) < 1e-5
    for name in a:
        assert close(a[name], b[name]), name


@needs_onednn
def test_a_strided_bias_is_read_as_its_values():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(16)[::2]  # a bias view with stride 2
    assert close(linear(x, w, b), F.linear(x, w, b))


@needs_onednn
def test_a_double_backward_raises_instead_of_returning_zeros():
    x = torch.randn(3, 8, requires_grad=True)
    module = torch.nn.Linear(8, 4)
    (gx,) = torch.autograd.grad(module_linear(x, module).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), module.weight)
