"""The composed Hydra config: attention presets, type/count agreement, experiments."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gpt_lightning.config import gpt_config_from_cfg
from gpt_lightning.errors import UserError

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("attention, kv", [("mha", 8), ("gqa", 2), ("mqa", 1)])
def test_attention_presets(attention, kv):
    c = cfg(f"attention={attention}")
    model = gpt_config_from_cfg(c, vocab_size=50257)
    assert (c.attention.type, c.attention.n_heads, c.attention.kv_groups) == (attention, 8, kv)
    assert (model.n_head, model.n_kv_groups, model.vocab_size) == (8, kv, 50257)


def test_mha_follows_its_head_count():
    assert cfg("attention=mha", "attention.n_heads=4", "model.n_embd=128").attention.kv_groups == 4


@pytest.mark.parametrize("overrides, message", [
    (["attention=mha", "attention.kv_groups=2"], "attention=mha needs kv_groups = n_heads, got kv_groups=2"),
    (["attention=mqa", "attention.kv_groups=2"], "attention=mqa needs kv_groups=1, got kv_groups=2"),
    (["attention=gqa", "attention.kv_groups=3"], "attention.kv_groups=3 does not divide attention.n_heads=8"),
    (["attention.type=sparse"], "attention.type='sparse' is unknown"),
    (["attention=gqa", "model.n_embd=100"], "n_embd=100 is not divisible by n_head=8"),
])
def test_contradictions_are_clear_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        gpt_config_from_cfg(cfg(*overrides), vocab_size=257)


def test_gqa_spans_mqa_to_mha_for_sweeps():
    for kv in (1, 2, 4, 8):
        assert gpt_config_from_cfg(cfg("attention=gqa", f"attention.kv_groups={kv}"), 257).n_kv_groups == kv


@pytest.mark.parametrize("experiment, kv", [("seed_gqa", 2), ("seed_mha", 8)])
def test_seed_experiments_match_the_original_runs(experiment, kv):
    c = cfg(f"experiment={experiment}")
    assert (c.model.n_layer, c.model.n_embd, c.model.block_size, c.data.block_size) == (8, 512, 256, 256)
    assert (c.attention.n_heads, c.attention.kv_groups) == (8, kv)
    assert (c.optim.lr, c.optim.weight_decay, c.data.encoding) == (4e-4, 0.1, "o200k_base")


def test_gpt2_shape():
    c = cfg("model=gpt2", "attention=mha", "attention.n_heads=12")
    m = gpt_config_from_cfg(c, 50257)
    assert (m.n_layer, m.n_embd, m.n_head, m.block_size, m.padded_vocab_size) == (12, 768, 12, 1024, 50304)


def test_trainer_presets():
    assert cfg().trainer.accelerator == "auto"
    assert cfg("trainer=gpu").trainer.accelerator == "gpu"
    assert cfg("trainer=ddp").trainer.strategy == "ddp"
    assert cfg("trainer=cpu", "trainer.max_steps=7").trainer.max_steps == 7
