"""model.match_params: a GQA/MQA model's MLP widened to MHA's parameter count (Llama 2, section A.2.1)."""

import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.training.checkpoints import init_state_from, load_gpt
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.run_record import RunRecord

CONF = str(Path(__file__).resolve().parents[1] / "conf")
VOCAB = 257  # a small vocabulary: the embeddings do not hide a mismatch in the blocks
SHAPES = {"small": ["model.n_embd=256", "model.n_layer=4"], "wide": ["model.n_embd=512", "model.n_layer=2"]}


def model_config(*overrides) -> GPTConfig:
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("config", overrides=["attention=gqa", "model.n_heads=8", *overrides])
    return gpt_config_from_cfg(cfg, VOCAB)


def params(config: GPTConfig) -> int:
    return GPT(config).num_params(non_embedding=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kv_groups", [1, 2, 4])
def test_matched_arms_have_mhas_parameter_count_within_half_a_percent(shape, kv_groups):
    mha = params(model_config(*SHAPES[shape], "attention.kv_groups=8"))
    plain = model_config(*SHAPES[shape], f"attention.kv_groups={kv_groups}")
    matched = model_config(*SHAPES[shape], f"attention.kv_groups={kv_groups}", "model.match_params=true")
    assert plain.mlp_hidden is None and matched.mlp_hidden > 4 * matched.n_embd
    assert abs(params(matched) - mha) <= 0.005 * mha
    assert abs(params(plain) - mha) > 0.005 * mha  # without matching, fewer KV heads is a smaller model


def test_match_params_on_mha_is_a_no_op_that_says_so(caplog):
    with caplog.at_level(logging.INFO):
        config = model_config("attention.kv_groups=8", "model.match_params=true")
    assert config.mlp_hidden is None and config.hidden == 4 * config.n_embd
    assert "model.match_params=true on an MHA model" in caplog.text and "nothing to match" in caplog.text


def test_the_record_and_the_mlp_carry_the_widened_size():
    config = model_config("attention.kv_groups=1", "model.match_params=true")
    model = GPT(config)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (config.mlp_hidden, config.n_embd)
    assert RunRecord.for_model("train", model).mlp_hidden == config.mlp_hidden


def checkpoint(model: GPT, drop_mlp_hidden: bool = False) -> dict:
    """A checkpoint as train writes it (the GPTConfig in hparams); optionally one from before mlp_hidden existed."""
    hparams = asdict(model.config)
    if drop_mlp_hidden:
        del hparams["mlp_hidden"]
    return {"hyper_parameters": {"model": hparams, "optim": {}, "encoding": "bytes"},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 10}


def test_a_matched_checkpoint_rebuilds_its_wide_mlp_and_an_old_one_still_loads():
    matched = GPT(model_config("attention.kv_groups=2", "model.match_params=true"))
    loaded, _ = load_gpt(checkpoint(matched))
    assert loaded.config.mlp_hidden == matched.config.mlp_hidden
    old = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=4, n_kv_groups=4, n_embd=32))
    assert load_gpt(checkpoint(old, drop_mlp_hidden=True))[0].config.hidden == 128


def test_init_from_an_mha_parent_into_a_matched_gqa_is_refused_in_one_line(tmp_path):
    parent = GPT(model_config("attention.kv_groups=8"))
    torch.save(checkpoint(parent), tmp_path / "mha.ckpt")
    target = model_config("attention.kv_groups=2", "model.match_params=true")
    with pytest.raises(UserError, match=r"has an MLP of 1024 units, this model 12\d\d .*set model.match_params=false"):
        init_state_from(str(tmp_path / "mha.ckpt"), target, "bytes")
    plain = model_config("attention.kv_groups=2")  # the same parent into an unmatched GQA: pooled as before
    assert init_state_from(str(tmp_path / "mha.ckpt"), plain, "bytes")["transformer.h.0.mlp.c_fc.weight"].shape[0] == 1024
