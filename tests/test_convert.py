"""MHA -> GQA pooling and Hugging Face GPT-2 loading."""

import pytest
import torch
from conftest import fit_briefly

from gpt_lightning.common.errors import UserError
from gpt_lightning.convert import load_hf_gpt2, pool_kv_heads
from gpt_lightning.model import GPT, GPTConfig


def mha(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=4, n_kv_groups=4, n_embd=32)).eval()


def test_pooling_to_n_head_is_the_identity():
    model = mha()
    x = torch.randint(0, 70, (2, 9))
    torch.testing.assert_close(pool_kv_heads(model, 4).eval()(x), model(x))


def test_pooled_heads_are_the_mean_of_each_contiguous_group():
    model = mha()
    w = model.transformer.h[1].attn.c_attn.weight  # rows: q (32) | k (4 heads x 8) | v (4 x 8)
    b = model.transformer.h[1].attn.c_attn.bias
    pooled = pool_kv_heads(model, 2)
    pw, pb = pooled.transformer.h[1].attn.c_attn.weight, pooled.transformer.h[1].attn.c_attn.bias
    assert pw.shape == (32 + 2 * 16, 32)
    torch.testing.assert_close(pw[:32], w[:32])  # queries copied
    k = [w[32 + 8 * h: 40 + 8 * h] for h in range(4)]
    v = [w[64 + 8 * h: 72 + 8 * h] for h in range(4)]
    torch.testing.assert_close(pw[32:40], (k[0] + k[1]) / 2)  # KV head 0 = mean of heads 0, 1
    torch.testing.assert_close(pw[40:48], (k[2] + k[3]) / 2)
    torch.testing.assert_close(pw[48:56], (v[0] + v[1]) / 2)
    torch.testing.assert_close(pw[56:64], (v[2] + v[3]) / 2)
    torch.testing.assert_close(pb[40:48], (b[48:56] + b[56:64]) / 2)
    torch.testing.assert_close(pooled.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)


def hand_model() -> GPT:
    """One layer, 4 heads of 2 dims: K/V head h's weight rows are filled with 10 * h + row (+ 100 for V), biases
    likewise, so every pooled row can be computed by hand."""
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=4, n_kv_groups=4, n_embd=8)).eval()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        for h in range(4):
            for r in range(2):
                attn.c_attn.weight[8 + 2 * h + r] = 10 * h + r        # K rows
                attn.c_attn.weight[16 + 2 * h + r] = 100 + 10 * h + r  # V rows
                attn.c_attn.bias[8 + 2 * h + r] = -(10 * h + r)
    return model


def test_mean_keeps_each_groups_average_by_hand():
    w = pool_kv_heads(hand_model(), 2, method="mean").transformer.h[0].attn.c_attn
    # group 0 = heads 0, 1: K rows (0 + 10) / 2 = 5 and (1 + 11) / 2 = 6; group 1 = heads 2, 3: 25, 26
    assert w.weight[8:12, 0].tolist() == [5, 6, 25, 26] and w.weight[12:16, 0].tolist() == [105, 106, 125, 126]
    assert w.bias[8:12].tolist() == [-5, -6, -25, -26]


def test_first_keeps_each_groups_first_head_by_hand():
    model = hand_model()
    w = pool_kv_heads(model, 2, method="first").transformer.h[0].attn.c_attn
    assert w.weight[8:12, 0].tolist() == [0, 1, 20, 21] and w.weight[12:16, 0].tolist() == [100, 101, 120, 121]
    assert w.bias[8:12].tolist() == [0, -1, -20, -21]
    torch.testing.assert_close(w.weight[:8], model.transformer.h[0].attn.c_attn.weight[:8])  # queries copied


def test_random_initialises_fresh_kv_projections_and_copies_the_rest():
    model = hand_model()
    torch.manual_seed(3)
    pooled = pool_kv_heads(model, 2, method="random")
    w = pooled.transformer.h[0].attn.c_attn
    kv = w.weight[8:16]
    assert kv.abs().max() < 0.2 and 0.01 < kv.std() < 0.03  # GPT-2's N(0, 0.02), nothing of the parent's
    assert w.bias[8:16].abs().max() == 0
    torch.testing.assert_close(w.weight[:8], model.transformer.h[0].attn.c_attn.weight[:8])
    torch.testing.assert_close(pooled.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    torch.manual_seed(3)
    torch.testing.assert_close(pool_kv_heads(model, 2, method="random").transformer.h[0].attn.c_attn.weight, w.weight)


def test_an_unknown_method_is_refused_before_any_work():
    with pytest.raises(UserError, match=r"method='median' is not a KV-head conversion method; use one of mean, "
                                        r"first, random"):
        pool_kv_heads(mha(), 3, method="median")  # 3 is no divisor either: the method is checked first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_pooling_keeps_the_sources_dtype(dtype, method):
    model = mha().to(dtype)
    pooled = pool_kv_heads(model, 2, method=method)
    assert {p.dtype for p in pooled.parameters()} == {dtype}
    if method == "mean":  # the mean is taken in fp32, then rounded once to the source's dtype
        k = model.transformer.h[0].attn.c_attn.weight[32:48].float()
        expected = ((k[:8] + k[8:16]) / 2).to(dtype)
        assert torch.equal(pooled.transformer.h[0].attn.c_attn.weight[32:40], expected)


def test_pooling_to_one_group_gives_mqa():
    pooled = pool_kv_heads(mha(), 1)
    assert pooled.config.n_kv_groups == 1 and pooled.new_cache(1).k[0].shape[1] == 1


def test_pooling_refuses_a_non_divisor():
    with pytest.raises(UserError, match="kv_groups=3"):
        pool_kv_heads(mha(), 3)


def test_pooled_trained_mha_starts_lower_than_a_fresh_gqa():
    torch.manual_seed(0)
    data = torch.randint(0, 70, (8, 17))
    data[:, 1::2] = (data[:, 0::2][:, :8] * 3) % 70  # a learnable pattern
    x, y = data[:, :-1], data[:, 1:]
    model = mha()
    fit_briefly(model, x, y, steps=60)
    pooled = pool_kv_heads(model, 2).eval()
    fresh = GPT(GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32)).eval()
    with torch.no_grad():
        assert pooled(x, y).item() < fresh(x, y).item() - 0.5


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return path, hf


def test_load_hf_gpt2_matches_hf_logits(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    ours = load_hf_gpt2(path).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert ours.config.padded_vocab_size == 320
    y = torch.randint(0, 300, (2, 20))
    with torch.no_grad():  # HF shifts labels itself: give it x followed by y's last token
        labels = torch.cat([x[:, :1], y], dim=1)
        hf_loss = hf(labels[:, :-1], labels=labels[:, :-1]).loss
        torch.testing.assert_close(ours(labels[:, :-2], labels[:, 1:-1]), hf_loss, atol=1e-5, rtol=1e-5)


def test_load_hf_gpt2_pooled_to_gqa(hf_gpt2_dir):
    path, _ = hf_gpt2_dir
    gqa = load_hf_gpt2(path, kv_groups=2)
    assert gqa.config.n_kv_groups == 2
    # HF's c_attn is a Conv1D of (in, 3 * C) columns: q | k | v, each C = 4 heads x 12 dims, head-major.
    C, hd = 48, 12
    for layer in range(2):
        w = hf_gpt2_dir[1].transformer.h[layer].attn.c_attn.weight.detach().t()  # (3C, C) rows, as nn.Linear
        b = hf_gpt2_dir[1].transformer.h[layer].attn.c_attn.bias.detach()
        ours_w = gqa.transformer.h[layer].attn.c_attn.weight
        ours_b = gqa.transformer.h[layer].attn.c_attn.bias
        torch.testing.assert_close(ours_w[:C], w[:C])  # queries untouched
        for part, offset in (("k", C), ("v", 2 * C)):
            for group in range(2):  # pooled head g = mean of HF heads 2g and 2g+1
                heads_w = [w[offset + h * hd: offset + (h + 1) * hd] for h in (2 * group, 2 * group + 1)]
                heads_b = [b[offset + h * hd: offset + (h + 1) * hd] for h in (2 * group, 2 * group + 1)]
                rows = slice(C + (part == "v") * 2 * hd + group * hd, C + (part == "v") * 2 * hd + (group + 1) * hd)
                torch.testing.assert_close(ours_w[rows], (heads_w[0] + heads_w[1]) / 2, msg=f"{part} {group}")
                torch.testing.assert_close(ours_b[rows], (heads_b[0] + heads_b[1]) / 2, msg=f"{part} {group}")


def test_load_hf_gpt2_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_hf_gpt2(tmp_path)


def copy_with_config(src, dst, **changes):
    """The folder `src` with config.json keys changed (a GPT-2 saved with those settings)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize("key, value, message", [
    ("scale_attn_weights", False, "scale_attn_weights=false"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=true"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06; ours is PyTorch's LayerNorm default 1e-5"),
    ("activation_function", "relu", "activation_function='relu'; ours is GELU"),
])
def test_load_hf_gpt2_refuses_a_key_that_changes_the_function(hf_gpt2_dir, tmp_path, key, value, message):
    folder = copy_with_config(hf_gpt2_dir[0], tmp_path / "hf", **{key: value})
    with pytest.raises(UserError) as e:
        load_hf_gpt2(folder)
    assert str(e.value).startswith(f"{folder}: {message}") and "\n" not in str(e.value)


def test_load_hf_gpt2_takes_reorder_and_upcast_attn_it_is_the_same_function(hf_gpt2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = copy_with_config(hf_gpt2_dir[0], tmp_path / "hf", reorder_and_upcast_attn=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.config.reorder_and_upcast_attn
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_gpt2(folder).eval()(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_load_hf_gpt2_takes_an_n_inner_mlp(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4, n_inner=136)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path).eval()
    assert ours.config.mlp_hidden == 136
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)
