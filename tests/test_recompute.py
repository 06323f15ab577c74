"""Training-memory savers: gelu(h) recomputed in backward, and one (V, C) gradient for the tied embedding + LM head.

Each must give aten's values and gradients, and must actually keep less alive than aten would.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpt_lightning.model.gpt as gpt_module
from gpt_lightning.measure.references import UnfusedHeadGPT
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.recompute import gelu_linear


def plain_gelu_linear(h, weight, bias):
    return F.linear(F.gelu(h, approximate="tanh"), weight, bias)


def mlp_inputs(bias=True):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, requires_grad=True)  # (B, T, H)
    w = torch.randn(8, 16, requires_grad=True)  # (C, H)
    b = torch.randn(8, requires_grad=True) if bias else None
    return h, w, b


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_linear_equals_aten_in_value_and_gradients(bias):
    h, w, b = mlp_inputs(bias)
    params = [t for t in (h, w, b) if t is not None]
    out = gelu_linear(h, w, b)
    ref = plain_gelu_linear(h, w, b)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_gelu_linear_under_bf16_autocast_has_atens_dtypes_and_values():
    h, w, b = mlp_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb = h * 1.0  # fp32 leaf -> an op, as c_fc's output would be
        out, ref = gelu_linear(hb.bfloat16(), w, b), plain_gelu_linear(hb.bfloat16(), w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    mine = torch.autograd.grad(out.float().sum(), (h, w, b), retain_graph=True)
    theirs = torch.autograd.grad(ref.float().sum(), (h, w, b))
    for m, t in zip(mine, theirs):
        assert m.dtype == t.dtype == torch.float32
        torch.testing.assert_close(m, t, atol=1e-2, rtol=1e-2)


def saved_bytes_of_an_mlp(model: GPT, x: torch.Tensor) -> int:
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.transformer.h[0].mlp(x)
    return sum(saved.values())


def test_the_mlp_keeps_one_hidden_activation_for_backward_not_two():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_groups=2, n_embd=16)).train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    ours = saved_bytes_of_an_mlp(model, x)
    gpt_module.gelu_linear, kept = plain_gelu_linear, gpt_module.gelu_linear
    try:
        aten = saved_bytes_of_an_mlp(model, x)
    finally:
        gpt_module.gelu_linear = kept
    hidden = 2 * 8 * 64 * 4  # one (B, T, 4C) fp32 tensor
    assert aten - ours == hidden


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32)


def test_gpt_gradients_equal_a_model_of_plain_aten_ops():
    config = tiny()
    ours = GPT(config)
    plain = UnfusedHeadGPT(config)  # nn.Embedding, full logits, NextTokenLoss
    plain.load_state_dict(ours.state_dict())
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    loss = ours(x, y)
    loss.backward()
    gpt_module.gelu_linear, kept = plain_gelu_linear, gpt_module.gelu_linear
    try:
        ref = plain(x, y)
        ref.backward()
    finally:
        gpt_module.gelu_linear = kept
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


class NewVocabSizedTensors(TorchDispatchMode):
    """Counts the distinct (V_padded, C) storages that ops return, once recording starts."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.known, self.new, self.recording = shape, set(), set(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and tuple(o.shape) == self.shape:
                ptr = o.untyped_storage().data_ptr()
                if self.recording and ptr not in self.known:
                    self.new.add(ptr)
                self.known.add(ptr)
        return out


def test_backward_adds_the_embedding_rows_to_the_lm_heads_gradient_in_place():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=24)
    model = GPT(config)  # (V_padded, C) = (128, 24): no other weight has that shape
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    with NewVocabSizedTensors((config.padded_vocab_size, config.n_embd)) as mode:
        loss = model(x, y)
        mode.recording = True
        loss.backward()
    # aten's embedding backward would build a second dense (V, C) gradient here, and the engine would sum the two
    assert not mode.new
    assert model.transformer.wte.weight.grad.untyped_storage().data_ptr() in mode.known


def test_a_frozen_embedding_gets_no_gradient_and_the_rest_still_trains():
    model = GPT(tiny())
    model.transformer.wte.weight.requires_grad_(False)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    model(x, y).backward()
    assert model.transformer.wte.weight.grad is None
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
