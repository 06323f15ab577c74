"""Types from a schema, ranges and agreements in `check_config`: each bad value is refused before any work."""

from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.training.config_checks import check_bench, check_config
from gpt_lightning.training.config_errors import one_line
from gpt_lightning.model.attention import MATMUL_ATTENTION_MAX_T
from gpt_lightning.model.loss import CHUNK_ELEMENTS
from gpt_lightning.training.memory_check import StepMemory, step_memory
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.schema import unknown_keys

CONF = str(Path(__file__).resolve().parents[1] / "conf")
DEBUG = ["experiment=debug", "trainer.accelerator=cpu"]  # byte tokens: no tokenizer file needed


def cfg(*overrides, name="config"):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("override", ["optim.lr=abc", "data.batch_size=abc", "seed=abc", "trainer.max_steps=abc",
                                      "data.books=[55752,abc]", "model.dropout=abc", "attention.kv_groups=two"])
def test_a_value_of_the_wrong_type_is_refused_by_hydra(override):
    with pytest.raises(ConfigCompositionException) as e:
        cfg(override)
    message = one_line(e.value)
    assert "\n" not in message and override.split("=")[0] in message and "could not be converted" in message


def test_a_misspelt_key_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException) as e:
        cfg("model.typo=1")
    assert one_line(e.value) == "Could not override 'model.typo': Key 'typo' not in 'ModelConfig'"


@pytest.mark.parametrize("override, key", [("+foo=1", "foo"), ("+model.typo=1", "model.typo"),
                                           ("+data.colour=red", "data.colour")])
def test_a_key_added_with_plus_is_refused_before_any_work(override, key):
    c = cfg(*DEBUG, override)  # Hydra's `+` composes past the schema (force_add) ...
    assert unknown_keys(c) == [key]
    with pytest.raises(UserError, match=rf"unknown config key {key}: not in the schema"):
        check_config(c)  # ... so check_config, the first thing train does, refuses it


def test_trainer_takes_any_lightning_trainer_argument_and_refuses_others():
    c = cfg(*DEBUG, "trainer.accumulate_grad_batches=2")  # not in the schema, no `+` needed: the node is open
    assert c.trainer.accumulate_grad_batches == 2
    check_config(c)
    with pytest.raises(UserError, match="trainer.acumulate_grad_batches is not an argument of lightning.Trainer"):
        check_config(cfg(*DEBUG, "trainer.acumulate_grad_batches=2"))


def test_the_defaults_and_every_experiment_pass_the_checks():
    check_config(cfg(*DEBUG))
    for experiment in ("seed_gqa", "seed_mha", "bench_cpu", "kv_sweep"):
        c = cfg(f"experiment={experiment}", "data.encoding=bytes", "trainer.accelerator=cpu")
        assert unknown_keys(c) == [] and check_config(c).block_size == c.model.block_size


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.retries=-1", "data.retries=-1 must be >= 0"),
    ("data.timeout=[0,0]", "data.timeout=[0, 0] must be a number of seconds > 0 or a pair [connect, read]"),
    ("data.timeout=[5]", "data.timeout=[5] must be a number of seconds > 0 or a pair [connect, read]"),
    ("data.timeout=0", "data.timeout=0 must be a number of seconds > 0 or a pair [connect, read]"),
    ("data.timeout=abc", "data.timeout='abc' must be a number of seconds > 0 or a pair [connect, read]"),
    ("data.block_size=32", "data.block_size=32 differs from model.block_size=64"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be >= 1"),
    ("trainer.max_steps=-2", "trainer.max_steps=-2 must be >= 1"),
    ("trainer.precision=bogus", "trainer.precision='bogus' is not a Lightning precision; use one of auto, "),
    ("attention.kv_groups=3", "attention.kv_groups=3 does not divide attention.n_heads=4"),
    ("+trainer.logger=false", "trainer.logger is set by train.py from the logger group"),
])
def test_each_range_or_consistency_rule_is_one_line(override, message):
    with pytest.raises(UserError) as e:
        check_config(cfg(*DEBUG, override))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_value_left_unset_is_one_line():
    with pytest.raises(UserError, match=r"^init_from must be set \(the config leaves it as \?\?\?\): add init_from=\.\.\.$"):
        check_config(cfg(*DEBUG, "init_from=???"))


def test_data_block_size_follows_the_model_unless_set():
    c = cfg(*DEBUG, "model.block_size=48")
    assert c.data.block_size == 48 and check_config(c).block_size == 48


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed", "32-true", "32", "16-mixed", "64-true"])
def test_lightning_precisions_pass(precision):
    check_config(cfg(*DEBUG, f"trainer.precision={precision}"))


def test_a_shape_that_cannot_fit_in_memory_is_refused_with_the_numbers():
    with pytest.raises(UserError) as e:
        check_config(cfg(*DEBUG, "model.block_size=10000000", "data.batch_size=16"))
    message = str(e.value)
    assert message.startswith("model.block_size=10000000 with data.batch_size=16")
    assert "GiB for one training step" in message and "GiB are" in message and "lower data.batch_size" in message


def test_the_memory_estimate_is_a_lower_bound_of_what_one_step_holds():
    model = gpt_config_from_cfg(cfg(*DEBUG), vocab_size=50257)
    need = step_memory(model, batch_size=16, precision="32-true")
    assert isinstance(need, StepMemory)
    # the fused loss holds one chunk of fp32 logits (at most CHUNK_ELEMENTS) and the (V, C) weight gradient: never
    # the (B*T, V) logits an unfused head would (the estimate used to count those, refusing steps that fit)
    N, V, C = 16 * model.block_size, model.padded_vocab_size, model.n_embd
    rows = min(N, CHUNK_ELEMENTS // V)
    assert V * C * 4 + rows // 2 * V * 4 < need.logits <= V * C * 4 + rows * V * 4 < N * V * 4
    assert need.total > need.logits
    bf16 = step_memory(model, 16, "bf16-mixed")
    assert bf16.activations * 2 == need.activations and bf16.logits < need.logits
    # CPU bf16 training keeps matmul_attention's (B, n_head, T, T) bf16 probabilities per layer, up to its length
    T, H, L = model.block_size, model.n_head, model.n_layer
    assert T <= MATMUL_ATTENTION_MAX_T
    cpu = step_memory(model, 16, "bf16-mixed", cpu=True)
    assert cpu.activations - bf16.activations == L * 16 * H * T * T * 2
    assert step_memory(model, 16, "32-true", cpu=True).activations == need.activations  # fp32 keeps SDPA
    assert step_memory(model, 16, "16-mixed", cpu=True) == step_memory(model, 16, "16-mixed")  # so does fp16
    longer = replace(model, block_size=2 * MATMUL_ATTENTION_MAX_T)
    assert step_memory(longer, 16, "bf16-mixed", cpu=True) == step_memory(longer, 16, "bf16-mixed")


@pytest.mark.parametrize("override", ["seed=abc", "temperature=abc", "max_new_tokens=x", "top_k=1.5"])
def test_generate_types_are_refused_by_hydra(override):
    with pytest.raises(ConfigCompositionException):
        cfg("ckpt_path=x.ckpt", override, name="generate")


@pytest.mark.parametrize("override", ["decode.repeats=abc", "data.batch_size=abc", "+decode.contxts=[1]"])
def test_evaluate_types_and_keys_are_checked(override):
    if override.startswith("+"):
        assert unknown_keys(cfg("ckpt_path=x.ckpt", override, name="evaluate")) == ["decode.contxts"]
    else:
        with pytest.raises(ConfigCompositionException):
            cfg("ckpt_path=x.ckpt", override, name="evaluate")


def test_bench_keeps_the_train_schema_and_adds_its_own():
    c = cfg(*DEBUG, "bench.steps=3", name="bench")
    assert OmegaConf.get_type(c).__name__ == "BenchConfig" and c.bench.steps == 3 and c.model.n_layer == 2
    assert unknown_keys(c) == []
    with pytest.raises(ConfigCompositionException):
        cfg(*DEBUG, "bench.steps=abc", name="bench")
    with pytest.raises(UserError, match=r"bench.steps=0 must be >= 1 \(timed training steps per round\)"):
        check_bench(cfg(*DEBUG, "bench.steps=0", name="bench").bench)
    with pytest.raises(UserError, match=r"bench.memory_repeats=0 must be >= 1"):
        check_bench(cfg(*DEBUG, "bench.memory_repeats=0", name="bench").bench)


TIMEOUTS = [("30", 30), ("2.5", 2.5), ("[10,60]", [10, 60])]  # README: [connect, read] seconds, or one for both


@pytest.mark.parametrize("timeout, value", TIMEOUTS)
def test_train_data_timeout_takes_one_number_or_a_pair(timeout, value):
    c = cfg(*DEBUG, f"data.timeout={timeout}")
    check_config(c)
    assert OmegaConf.to_container(c.data)["timeout"] == value


@pytest.mark.parametrize("timeout, value", TIMEOUTS)
def test_evaluate_data_timeout_takes_one_number_or_a_pair(timeout, value):
    c = cfg("ckpt_path=x.ckpt", f"data.timeout={timeout}", name="evaluate")
    assert OmegaConf.to_container(c.data)["timeout"] == value and unknown_keys(c) == []


def test_export_has_a_typed_schema():
    c = cfg("overwrite=no", name="export")
    assert OmegaConf.get_type(c).__name__ == "ExportConfig" and c.overwrite is False and unknown_keys(c) == []
    assert cfg("overwrite=yes", name="export").overwrite is True


@pytest.mark.parametrize("override, message", [
    ("data.timeout=0", "data.timeout=0 must be a number of seconds > 0"),
    ("data.retries=-1", "data.retries=-1 must be a whole number >= 0"),
    ("data.pause=-2", r"data.pause=-2(\.0)? must be a number of seconds >= 0"),
])
def test_evaluate_refuses_bad_http_settings_before_reading_the_checkpoint(override, message, tmp_path, monkeypatch):
    from gpt_lightning import evaluate as evaluate_cli

    monkeypatch.setattr(evaluate_cli, "evaluate_checkpoint", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    with pytest.raises(UserError, match=message):
        evaluate_cli.evaluate(cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", override, name="evaluate"))
    for ok in TIMEOUTS:  # a good value goes on to the checkpoint
        with pytest.raises(pytest.fail.Exception, match="loaded the checkpoint"):
            evaluate_cli.evaluate(cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", f"data.timeout={ok[0]}", name="evaluate"))
