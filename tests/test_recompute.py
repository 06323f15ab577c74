"""Training-memory savers: gelu(h) and the norms' outputs recomputed in backward, and one (V, C) gradient for the tied
embedding + LM head.

Each must give aten's values and gradients, and must actually keep less alive than aten would.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpt_lightning.model.gpt as gpt_module
from gpt_lightning.measure.references import UnfusedHeadGPT
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.recompute import gelu_linear, layer_norm_linear


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


def plain_layer_norm_linear(x, norm, linear):
    return linear(norm(x))


@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)],
                         ids=["gpt2", "no-bias", "no-norm-weights"])
@pytest.mark.parametrize("autocast", [False, True])
def test_layer_norm_linear_equals_the_two_modules_bit_for_bit(bias, affine, autocast):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)  # (B, T, C)
    norm = torch.nn.LayerNorm(16, bias=bias, elementwise_affine=affine)
    linear = torch.nn.Linear(16, 24, bias=bias)
    with torch.no_grad():  # away from LayerNorm's identity initialisation
        for p in norm.parameters():
            p.normal_()
    params = [x, *norm.parameters(), *linear.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        xs = x * 1.0  # the residual stream is an op's output, as in a block
        out, ref = layer_norm_linear(xs, norm, linear), plain_layer_norm_linear(xs, norm, linear)
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert type(out.grad_fn).__name__ == "LayerNormLinearBackward"  # the fused path, not the fallback
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = torch.randn_like(ref)
    mine = torch.autograd.grad(out, params, g, retain_graph=True)
    for m, t, p in zip(mine, torch.autograd.grad(ref, params, g), params):
        assert m.dtype == t.dtype == p.dtype
        torch.testing.assert_close(m, t, atol=0, rtol=0)


def saved_bytes(run, skip=()) -> int:
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


def test_a_block_keeps_no_normalised_copy_of_its_input_for_backward():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_groups=2, n_embd=16)).train()
    x = torch.randn(2, 8, 16, requires_grad=True) * 1.0
    block = model.transformer.h[0]
    ours = saved_bytes(lambda: block(x))
    gpt_module.layer_norm_linear, kept = plain_layer_norm_linear, gpt_module.layer_norm_linear
    try:
        aten = saved_bytes(lambda: block(x))
    finally:
        gpt_module.layer_norm_linear = kept
    # per norm, its (B, T, C) fp32 output and its (B, T, 1) mean and rstd: backward recomputes all three
    assert aten - ours == 2 * (2 * 8 * 16 * 4 + 2 * (2 * 8 * 4))


def test_without_gradients_the_norm_and_linear_run_as_modules():
    # decode swaps linears' forwards for its own weight layouts; they must still be called there
    norm, linear = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)
    calls = []
    linear.register_forward_hook(lambda *a: calls.append("linear"))
    norm.register_forward_hook(lambda *a: calls.append("norm"))
    with torch.no_grad():
        layer_norm_linear(torch.randn(2, 3, 16), norm, linear)
    assert calls == ["norm", "linear"]
    layer_norm_linear(torch.randn(2, 3, 16), norm, linear)  # with gradients: the fused Function
    assert calls == ["norm", "linear"]


def test_building_the_model_allocates_one_vocabulary_sized_weight():
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=4, n_kv_groups=2, n_embd=24)
    shape = (config.padded_vocab_size, config.n_embd)  # (128, 24): no other weight has that shape
    with NewVocabSizedTensors(shape, cpu_only=True) as mode:
        mode.recording = True
        model = GPT(config)
    # an nn.Linear LM head would allocate its own (V, C) weight only to drop it for the tied one
    assert mode.new == {model.transformer.wte.weight.untyped_storage().data_ptr()}


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
    gpt_module.layer_norm_linear, kept_norm = plain_layer_norm_linear, gpt_module.layer_norm_linear
    try:
        ref = plain(x, y)
        ref.backward()
    finally:
        gpt_module.gelu_linear, gpt_module.layer_norm_linear = kept, kept_norm
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


class NewVocabSizedTensors(TorchDispatchMode):
    """Counts the distinct (V_padded, C) storages that ops return, once recording starts."""

    def __init__(self, shape, cpu_only=False):
        super().__init__()
        self.shape, self.known, self.new, self.recording = shape, set(), set(), False
        self.cpu_only = cpu_only  # ignore meta tensors (shapes without storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and tuple(o.shape) == self.shape and not (self.cpu_only and o.is_meta):
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


@pytest.mark.parametrize("kv_groups, mlp_hidden", [(4, None), (2, None), (1, None), (1, 40)])
def test_the_memory_checks_activation_estimate_is_at_most_what_a_block_keeps(kv_groups, mlp_hidden):
    from gpt_lightning.training.memory_check import step_memory

    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=4, n_kv_groups=kv_groups, n_embd=32,
                       mlp_hidden=mlp_hidden)
    block = GPT(config).train().transformer.h[0]
    x = torch.randn(2, 8, 32, requires_grad=True) * 1.0  # (B, T, C) at batch 2
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = saved_bytes(lambda: block(x), skip=weights)  # activations only: the weights are counted apart
    estimate = step_memory(config, batch_size=2, precision="32-true").activations  # one layer
    assert estimate <= kept < 1.25 * estimate  # a lower bound, and not a loose one
