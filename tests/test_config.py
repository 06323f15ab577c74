"""The composed Hydra config: attention presets, type/count agreement, experiments."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gpt_lightning.common.errors import UserError
from gpt_lightning.training.model_config import gpt_config_from_cfg

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


@pytest.mark.parametrize("experiment, label", [("seed_gqa", "gqa"), ("seed_mha", "mha"), ("bench_cpu", "mha"),
                                               ("debug", "gqa")])
def test_every_experiment_builds_a_valid_model_whose_windows_follow_its_context(experiment, label):
    c = cfg(f"experiment={experiment}")
    model = gpt_config_from_cfg(c, vocab_size=257)
    assert model.attention == label
    assert c.data.block_size == model.block_size


def test_model_gpt2_alone_is_the_124m_gpt2_shape():
    from gpt_lightning.model import GPT

    m = gpt_config_from_cfg(cfg("model=gpt2", "attention=mha"), 50257)
    assert (m.n_layer, m.n_embd, m.n_head, m.n_kv_groups, m.block_size) == (12, 768, 12, 12, 1024)
    # OpenAI's GPT-2 small: 124,439,808 parameters; ours pads the vocabulary to 50304 rows (+47 x 768).
    assert GPT(m).num_params(non_embedding=False) == 124_439_808 + 47 * 768


def test_model_gpt2_head_counts_still_follow_the_attention_keys():
    m = gpt_config_from_cfg(cfg("model=gpt2", "attention=gqa", "attention.kv_groups=4"), 50257)
    assert (m.n_head, m.n_kv_groups, m.attention) == (12, 4, "gqa")
    m = gpt_config_from_cfg(cfg("model=gpt2", "attention=mha", "attention.n_heads=6"), 50257)
    assert (m.n_head, m.n_kv_groups) == (6, 6)


def sweep_subdir(*overrides) -> str:
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        c = compose("config", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(c.hydra.sweep, resolve=True)["subdir"]


@pytest.mark.parametrize("kv, label", [(1, "mqa"), (2, "gqa"), (4, "gqa"), (8, "mha")])
def test_sweep_folders_are_named_by_the_counts_not_the_preset(kv, label):
    subdir = sweep_subdir("attention=gqa", f"attention.kv_groups={kv}", "hydra.job.num=0", "seed=3")
    assert subdir == f"0_{label}_h8_kv{kv}_s3"


def test_kv_sweep_matched_is_kv_sweep_with_parameter_matched_arms():
    from omegaconf import OmegaConf

    matched, plain = cfg("experiment=kv_sweep_matched"), cfg("experiment=kv_sweep")
    assert matched.model.match_params is True and plain.model.match_params is False
    for group in ("attention", "trainer", "optim", "data"):
        assert OmegaConf.to_container(matched[group]) == OmegaConf.to_container(plain[group]), group
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        sweep = compose("config", overrides=["experiment=kv_sweep_matched"], return_hydra_config=True)
    assert dict(sweep.hydra.sweeper.params) == {"attention.kv_groups": "1,2,4,8"}


def test_uptrain_study_sweeps_every_method_and_alpha_into_named_folders():
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        study = compose("config", overrides=["experiment=uptrain_study", "hydra.job.num=4", "uptrain.method=first",
                                             "uptrain.alpha=0.05"], return_hydra_config=True)
        parent = compose("config", overrides=["experiment=uptrain_study_with_parent"], return_hydra_config=True)
    assert dict(study.hydra.sweeper.params) == {"uptrain.method": "mean,first,random,scratch",
                                                "uptrain.alpha": "0,0.05,0.1"}
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(study.hydra.sweep, resolve=True)["subdir"] == "4_first_a0.05_gqa_kv2_s1337"
    assert study.uptrain.optim.lr < study.optim.lr  # converted models continue at a small rate
    assert (parent.uptrain.parent, parent.init_from) == ("train", None)


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_different_directories():
    import subprocess
    import sys

    code = ("import gpt_lightning.training.model_config\n"
            "from hydra import compose, initialize_config_dir\n"
            "from omegaconf import OmegaConf\n"
            f"with initialize_config_dir(version_base='1.3', config_dir={CONF!r}):\n"
            "    c = compose('config', return_hydra_config=True)\n"
            "print(OmegaConf.to_container(c.hydra.run, resolve=True)['dir'])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(d.startswith("outputs/runs/") for d in dirs) and dirs[0] != dirs[1]


def test_every_trainer_preset_is_accepted_by_lightning_trainer():
    import inspect

    import lightning as L

    accepted = set(inspect.signature(L.Trainer).parameters)
    for preset in ("default", "cpu", "gpu", "ddp"):
        assert set(cfg(f"trainer={preset}").trainer) <= accepted, preset


def test_kv_sweep_seeds_is_kv_sweep_on_three_seeds_with_seed_as_the_outer_loop():
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        seeds = compose("config", overrides=["experiment=kv_sweep_seeds"], return_hydra_config=True)
        single = compose("config", overrides=["experiment=kv_sweep"], return_hydra_config=True)
    for group in ("model", "attention", "trainer", "optim", "data"):
        assert OmegaConf.to_container(seeds[group]) == OmegaConf.to_container(single[group]), group
    assert list(seeds.hydra.sweeper.params.items()) == [("seed", "1,2,3"), ("attention.kv_groups", "1,2,4,8")]


@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], r"seed=-1 must be an integer in \[0, 2\*\*32 - 1\]"),
    (["seed=4294967296"], "seed=4294967296 must be an integer"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be > 0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    (["trainer.val_check_interval='00:00:00:00'"], r"trainer.val_check_interval='00:00:00:00' is 0 s: a duration "
                                                   r"must be > 0"),
    (["trainer.val_check_interval={minutes:-5}"], r"trainer.val_check_interval=\{'minutes': -5\} is -300 s"),
    (["trainer.val_check_interval=abc"], r"trainer.val_check_interval='abc' is not a duration \(Invalid time format"),
    (["trainer.val_check_interval={weeks:1,fortnights:2}"], r"is not a duration \(.*fortnights"),
])
def test_values_lightning_would_only_trip_on_mid_run_are_refused_up_front(overrides, message):
    # each was a traceback: seed_everything's ValueError, or a ZeroDivisionError once training ran
    from gpt_lightning.training.config_checks import check_config

    with pytest.raises(UserError, match=message):
        check_config(cfg("trainer=cpu", *overrides))


@pytest.mark.parametrize("interval", ["'00:00:10:00'", "{minutes:10}", "0.25", "50"])
def test_a_time_based_val_check_interval_is_left_to_lightning(interval):
    # Lightning takes "DD:HH:MM:SS" and a dict of timedelta's keys too; the up-front check must not refuse them
    import lightning as L

    from gpt_lightning.training.config_checks import check_config

    c = cfg("trainer=cpu", f"trainer.val_check_interval={interval}")
    check_config(c)
    value = c.trainer.val_check_interval
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              val_check_interval=dict(value) if not isinstance(value, (int, float, str)) else value)
