"""Export to a Hugging Face folder (`gpt_lightning.export`, `gpt_lightning/model/export.py`) and back (`init_from=hf:`)."""

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch
from conftest import REPO, TRAIN_ENV

from gpt_lightning.common.errors import UserError
from gpt_lightning.convert import export_hf, load_hf_gpt2, pool_kv_heads
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.export import resolve_architecture, write_folder
from gpt_lightning.training.checkpoints import init_state_from

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")

VOCAB = 257  # the bytes encoding


def tiny(kv_groups: int, bias: bool = True, seed: int = 0) -> GPT:
    """A random tiny GPT, its weights (biases included) moved off their init so every tensor matters."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=4, n_kv_groups=kv_groups, n_embd=32,
                          bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(folder, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf, hf(x).logits


ATTENTION = {"mha": 4, "gqa": 2, "mqa": 1}
HF_CLASS = {"mha": "GPT2LMHeadModel", "gqa": "GPT2LMHeadModel", "mqa": "GPTBigCodeForCausalLM"}


@pytest.mark.parametrize("attention", ATTENTION)
def test_exported_logits_equal_ours(attention, tmp_path):
    model = tiny(ATTENTION[attention])
    export_hf(model, tmp_path / "hf", encoding="bytes")
    x = torch.randint(0, VOCAB, (2, 24))
    hf, logits = hf_logits(tmp_path / "hf", x)
    assert type(hf).__name__ == HF_CLASS[attention]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


def test_mqa_exports_as_gpt2_by_repetition_when_asked(tmp_path):
    model = tiny(1)
    export_hf(model, tmp_path / "hf", encoding="bytes", architecture="gpt2")
    x = torch.randint(0, VOCAB, (2, 24))
    hf, logits = hf_logits(tmp_path / "hf", x)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


def test_a_model_without_biases_exports_with_zero_biases(tmp_path):
    model = tiny(2, bias=False)
    export_hf(model, tmp_path / "hf", encoding="bytes")
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", x)[1], model(x), atol=1e-5, rtol=1e-5)


def test_hf_greedy_generation_equals_ours_for_gqa(tmp_path):
    model = tiny(2)
    export_hf(model, tmp_path / "hf", encoding="bytes")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    ours = model.generate(prompt, 12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def same_weights(a: GPT, b: GPT) -> bool:
    """Every weight equal bit for bit, except the vocabulary padding rows (never read; exports drop them)."""
    sa, sb, V = a.state_dict(), b.state_dict(), a.config.vocab_size
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k][:V], sb[k][:V]) if k in ("transformer.wte.weight", "lm_head.weight")
        else torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("attention", ATTENTION)
def test_an_export_loads_back_as_the_same_model(attention, tmp_path):
    model = tiny(ATTENTION[attention], bias=attention != "mha")
    export_hf(model, tmp_path / "hf", encoding="bytes")
    back = load_hf_gpt2(tmp_path / "hf")
    assert back.config == model.config
    assert same_weights(back, model)


def test_gqa_repeated_kv_heads_collapse_back_exactly(tmp_path):
    model = tiny(2)
    export_hf(model, tmp_path / "hf", encoding="bytes")  # GPT-2: 4 KV heads, each of the 2 repeated twice
    state = init_state_from(f"hf:{tmp_path / 'hf'}", model.config, "bytes")
    for i in range(2):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        assert torch.equal(state[key], model.state_dict()[key])  # q | 2 K heads | 2 V heads, bit for bit


def test_a_gqa_export_can_be_pooled_further_to_mqa(tmp_path):
    model = tiny(2)
    export_hf(model, tmp_path / "hf", encoding="bytes")
    target = GPTConfig(**{**asdict(model.config), "n_kv_groups": 1})
    state = init_state_from(f"hf:{tmp_path / 'hf'}", target, "bytes")
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32 + 2 * 8, 32)


def test_init_from_an_export_needs_its_encoding(tmp_path):
    model = tiny(4)
    export_hf(model, tmp_path / "hf", encoding="bytes")
    with pytest.raises(UserError, match="data.encoding=bytes"):
        init_state_from(f"hf:{tmp_path / 'hf'}", model.config, "gpt2")


def test_gpt_bigcode_cannot_express_gqa():
    with pytest.raises(UserError, match="kv_groups=2 .*architecture=gpt2"):
        resolve_architecture(tiny(2).config, "gpt_bigcode")


def test_gpt_bigcode_is_refused_for_mha_in_one_line(tmp_path):
    # we write GPTBigCode as multi_query only: an MHA c_attn (3C, C) under multi_query=true loads nowhere
    with pytest.raises(UserError) as e:
        export_hf(tiny(4), tmp_path / "hf", encoding="bytes", architecture="gpt_bigcode")
    assert str(e.value) == ("cannot export kv_groups=4 (of 4 heads) as gpt_bigcode: it is written with one KV head "
                            "(multi_query, MQA only); use architecture=gpt2 (weights as they are, exact)")
    assert not (tmp_path / "hf").exists()


def matched_gqa() -> GPT:
    """A GQA model with model.match_params=true's wider MLP (mlp_hidden != 4 * n_embd)."""
    from gpt_lightning.training.model_config import matched_mlp_hidden

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32,
                       mlp_hidden=matched_mlp_hidden(32, 4, 2))
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_a_matched_params_gqa_export_loads_back_exactly(tmp_path):
    model = matched_gqa()
    assert model.config.hidden != 4 * model.config.n_embd
    export_hf(model, tmp_path / "hf", encoding="bytes")
    back = load_hf_gpt2(tmp_path / "hf").eval()
    assert back.config == model.config and same_weights(back, model)
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        torch.testing.assert_close(hf_logits(tmp_path / "hf", x)[1], model(x), atol=1e-5, rtol=1e-5)
    state = init_state_from(f"hf:{tmp_path / 'hf'}", model.config, "bytes")  # init_from=hf:DIR
    assert all(torch.equal(state[k], v) for k, v in back.state_dict().items())


def fine_tune_one_kv_head(folder):
    """What training the GPT-2 export in transformers does to it: the copies of a KV head drift apart (here layer
    0's KV head 1 only; save_pretrained keeps config.json's gpt_lightning key)."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    w = state["transformer.h.0.attn.c_attn.weight"]  # Conv1D (C, 3C): columns q | k | v, 4 heads of 8
    w[:, 32 + 8: 32 + 16] += 0.01  # K head 1: its group's first head (head 0) stays as it was
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_gqa_export_trained_further_loads_as_mha_with_a_warning(tmp_path):
    export_hf(tiny(2), tmp_path / "hf", encoding="bytes")
    fine_tune_one_kv_head(tmp_path / "hf")
    with pytest.warns(RuntimeWarning, match=rf"{tmp_path / 'hf'}: config.json records 2 KV heads .* loading it as "
                                            rf"MHA with 4 KV heads, not averaged"):
        back = load_hf_gpt2(tmp_path / "hf").eval()
    assert back.config.n_kv_groups == 4
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():  # the folder's own function, not an average of it
        torch.testing.assert_close(back(x), hf_logits(tmp_path / "hf", x)[1], atol=1e-5, rtol=1e-5)


def test_a_gqa_export_trained_further_is_pooled_when_kv_groups_is_asked(tmp_path, recwarn):
    export_hf(tiny(2), tmp_path / "hf", encoding="bytes")
    fine_tune_one_kv_head(tmp_path / "hf")
    pooled = load_hf_gpt2(tmp_path / "hf", kv_groups=2)
    assert pooled.config.n_kv_groups == 2 and not [w for w in recwarn if w.category is RuntimeWarning]
    with pytest.warns(RuntimeWarning):
        unpooled = load_hf_gpt2(tmp_path / "hf")
    assert torch.equal(pooled.state_dict()["transformer.h.0.attn.c_attn.weight"],
                       pool_kv_heads(unpooled, 2).state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_a_model_feature_hf_lacks_is_refused():
    @dataclass
    class RotaryConfig(GPTConfig):
        rotary: bool = False

    config = RotaryConfig(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_kv_groups=2, n_embd=8, rotary=True)
    with pytest.raises(UserError, match="cannot export: rotary=True has no Hugging Face GPT-2 equivalent"):
        resolve_architecture(config)


@pytest.mark.parametrize("kv_groups", [2, 1])  # GPT-2 and GPTBigCode folders
def test_gpt2_export_writes_a_tokenizer_hf_loads(kv_groups, tmp_path, require_encoding):
    enc = require_encoding("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=16, n_layer=1, n_head=2, n_kv_groups=kv_groups,
                          n_embd=16))
    export_hf(model, tmp_path / "hf", encoding="gpt2")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Capítulo I — «Dom Casmurro», d'elle;  n'uma   tarde.\n\nFim<|endoftext|>"
    ids = enc.encode(text, allowed_special="all")
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id == enc.eot_token == json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]


# --- the folder: all or nothing, never over a non-empty one unless asked ------------------------------------------

def test_write_folder_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; pass overwrite=true"):
        write_folder(out, {"a": b"1"})
    assert (out / "keep.txt").read_text() == "mine"


def test_write_folder_overwrite_replaces_the_folder(tmp_path):
    out = tmp_path / "out"
    write_folder(out, {"a": b"1", "b": b"2"})
    write_folder(out, {"a": b"3"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a"] and (out / "a").read_bytes() == b"3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left


def test_a_failed_write_leaves_the_previous_folder_and_no_half_folder(tmp_path):
    out = tmp_path / "out"
    write_folder(out, {"a": b"1"})
    with pytest.raises(FileNotFoundError):
        write_folder(out, {"b": b"2", "missing/dir/c": b"3"}, overwrite=True)  # fails half way
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- the command ---------------------------------------------------------------------------------------------------

def save_checkpoint(model: GPT, path, encoding: str = "bytes"):
    """A checkpoint as gpt_lightning.train writes it (the keys load_gpt reads)."""
    torch.save({"hyper_parameters": {"model": asdict(model.config), "optim": {}, "compile": False,
                                     "encoding": encoding},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def export_cli(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_lightning.export", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=TRAIN_ENV)


@pytest.mark.slow
def test_export_command_writes_weights_and_a_tokenizer_note(tmp_path):
    ckpt = save_checkpoint(tiny(2), tmp_path / "m.ckpt")
    result = export_cli(tmp_path, f"ckpt_path={ckpt}", "out=hf")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "supply the tokenizer yourself" in result.stderr
    assert "No tokenizer is included" in (tmp_path / "hf" / "README.md").read_text()
    assert "GPT2LMHeadModel" in result.stdout


@pytest.mark.slow
def test_export_command_refuses_a_non_empty_folder_then_overwrites_when_asked(tmp_path):
    ckpt = save_checkpoint(tiny(1), tmp_path / "m.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    refused = export_cli(tmp_path, f"ckpt_path={ckpt}", "out=hf")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"error: out={tmp_path / 'hf'} is not empty; pass overwrite=true "
                                                   f"to replace it, or another folder"]
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
    done = export_cli(tmp_path, f"ckpt_path={ckpt}", "out=hf", "overwrite=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "hf" / "notes.txt").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt_bigcode"


def export_cfg(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("export", overrides=list(overrides))


@pytest.mark.parametrize("no", ["no", "false", "'false'", "off"])
def test_overwrite_no_keeps_a_non_empty_folder(no, tmp_path):
    from gpt_lightning.export import export

    ckpt = save_checkpoint(tiny(2), tmp_path / "m.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    cfg = export_cfg(f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}", f"overwrite={no}")
    assert cfg.overwrite is False
    with pytest.raises(UserError, match="is not empty; pass overwrite=true"):
        export(cfg)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["notes.txt"]


def test_export_refuses_a_bad_overwrite_value_or_a_misspelt_key():
    from hydra.errors import ConfigCompositionException

    from gpt_lightning.training.config_errors import one_line
    from gpt_lightning.training.schema import unknown_keys

    with pytest.raises(ConfigCompositionException) as e:
        export_cfg("overwrite=maybe")
    assert "overwrite" in one_line(e.value) and "\n" not in one_line(e.value)
    with pytest.raises(ConfigCompositionException):
        export_cfg("typo=1")
    assert unknown_keys(export_cfg("+typo=1")) == ["typo"]


def test_the_architecture_name_is_checked_before_the_checkpoint_is_read(tmp_path):
    from gpt_lightning.export import export

    with pytest.raises(UserError, match="architecture='bigcode' is not one of auto, gpt2, gpt_bigcode"):
        export(export_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'hf'}",
                          "architecture=bigcode"))


@pytest.mark.slow
def test_export_command_reports_a_bad_key_in_one_line_with_status_2(tmp_path):
    result = export_cli(tmp_path, "ckpt_path=m.ckpt", "out=hf", "typo=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: Could not override 'typo': Key 'typo' not in 'ExportConfig'"]
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_export_command_overwrite_no_keeps_the_folder(tmp_path):
    ckpt = save_checkpoint(tiny(2), tmp_path / "m.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    result = export_cli(tmp_path, f"ckpt_path={ckpt}", "out=hf", "overwrite=no")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: out={tmp_path / 'hf'} is not empty; pass overwrite=true "
                                                  f"to replace it, or another folder"]
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
