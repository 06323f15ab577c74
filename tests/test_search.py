"""Per-arm hyperparameter search (`hparams_search=lr`), what a run returns to it, and divergence handling."""

import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
import yaml
from conftest import TRAIN_ENV, train_command
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import LogUniformDistribution, UniformDistribution
from torch.utils.data import DataLoader, TensorDataset

from gpt_lightning.analysis.search import read_search_results, search_section
from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPTConfig
from gpt_lightning.training.divergence import DivergenceGuard, TrainingDiverged, stop_diverged
from gpt_lightning.training.module import GPTLightningModule
from gpt_lightning.training.per_arm_sweeper import PerArmSearch, flatten, split_overrides
from gpt_lightning.training.run_record import RunRecord
from gpt_lightning.training.search import check_hparams_search, search_objective

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# --- what train returns to the sweeper ----------------------------------------------------------------------------

def test_objective_is_the_best_val_bpb_when_the_run_measured_bpb():
    record = RunRecord(kind="train", best_val_loss=2.0, val_loss=2.5, val_bpb=1.25)  # bpb = loss * 0.5 here
    assert search_objective(record) == pytest.approx(1.0)


def test_objective_falls_back_to_the_best_val_loss():
    assert search_objective(RunRecord(kind="train", best_val_loss=2.0, val_loss=2.5)) == 2.0


def test_objective_of_a_failed_run_is_nan():
    assert math.isnan(search_objective(RunRecord(kind="train", status="failed", best_val_loss=2.0)))
    assert math.isnan(search_objective(None))


# --- the config ---------------------------------------------------------------------------------------------------

def test_hparams_search_lr_selects_the_per_arm_sweeper():
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("config", overrides=["hparams_search=lr"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.gpt_lightning_search.per_arm_sweeper.PerArmOptunaSweeper"
    assert sweeper.n_trials == 8 and sweeper.sampler.seed is not None and sweeper.storage is None
    assert sweeper.params["optim.lr"] == "tag(log, interval(1e-4, 1e-2))"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.seed == 1337


def test_an_unknown_search_names_the_available_ones():
    with pytest.raises(UserError) as e:
        check_hparams_search(["experiment=debug", "hparams_search=x"])
    assert str(e.value) == "hparams_search=x is unknown; available: lr, lr_wd_warmup (conf/hparams_search/)"
    check_hparams_search(["hparams_search=lr"])  # known: no error


def test_lists_are_arms_intervals_are_searched_the_rest_is_fixed():
    arms, space, fixed = split_overrides(
        ["attention.kv_groups=1,2,4,8", "trainer.max_steps=300", "optim.weight_decay=interval(0.0,0.2)"],
        {"optim.lr": "tag(log, interval(1e-4, 1e-2))"})
    assert arms == {"attention.kv_groups": ["1", "2", "4", "8"]}
    assert space == {"optim.lr": LogUniformDistribution(1e-4, 1e-2), "optim.weight_decay": UniformDistribution(0, 0.2)}
    assert fixed == ["trainer.max_steps=300"]


@pytest.mark.parametrize("experiment, arms", [
    ("kv_sweep", {"attention.kv_groups": ["1", "2", "4", "8"]}),
    ("kv_sweep_seeds", {"seed": ["1", "2", "3"], "attention.kv_groups": ["1", "2", "4", "8"]})])
def test_a_presets_lists_are_arms_not_search_dimensions(experiment, arms):
    """experiment=kv_sweep puts its list in hydra.sweeper.params, beside the search preset's interval."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("config", overrides=[f"experiment={experiment}", "hparams_search=lr"], return_hydra_config=True)
    found, space, fixed = split_overrides([], flatten(cfg.hydra.sweeper.params))
    assert found == arms and space == {"optim.lr": LogUniformDistribution(1e-4, 1e-2)} and fixed == []


def test_a_command_line_value_pins_a_presets_arm():
    arms, space, fixed = split_overrides(["attention.kv_groups=2"], {"seed": "1,2", "attention.kv_groups": "1,2,4,8",
                                                                     "optim.lr": "interval(1e-4, 1e-2)"})
    assert arms == {"seed": ["1", "2"]} and list(space) == ["optim.lr"] and fixed == ["attention.kv_groups=2"]


def test_a_command_line_list_of_a_searched_key_makes_it_an_arm():
    arms, space, _ = split_overrides(["optim.lr=1e-3,3e-3"], {"optim.lr": "tag(log, interval(1e-4, 1e-2))"})
    assert arms == {"optim.lr": ["0.001", "0.003"]} and space == {}


def test_a_failed_job_is_a_failed_trial():
    study = optuna.create_study()
    for ret in (JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom")),
                JobReturn(status=JobStatus.COMPLETED, _return_value=float("nan"))):
        PerArmSearch._tell(study, study.ask(), ret, "s")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2


# --- divergence -----------------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_and_records_it_as_failed(tmp_path):
    torch.manual_seed(0)
    module = GPTLightningModule.from_config(
        GPTConfig(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_kv_groups=1, n_embd=16),
        {"lr": 1e30, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 0, "min_lr": 1.0}, encoding="bytes")
    data = torch.randint(0, 257, (64, 9))
    trainer = L.Trainer(max_steps=50, callbacks=[DivergenceGuard()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")
    with pytest.raises(TrainingDiverged, match=r"training diverged: train/loss=(nan|inf) at step \d+ \(optim.lr=1e\+30\)"):
        trainer.fit(module, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4))
    assert trainer.global_step < 50
    record = RunRecord.load(tmp_path / "summary.json")
    assert record.status == "failed" and record.error.startswith("training diverged")


def test_a_diverged_single_run_exits_3_and_a_sweep_job_returns_nan():
    with pytest.raises(SystemExit) as e:
        stop_diverged(TrainingDiverged("x"), multirun=False)
    assert e.value.code == 3
    assert math.isnan(stop_diverged(TrainingDiverged("x"), multirun=True))


# --- end to end -----------------------------------------------------------------------------------------------------

FAST = ["trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "~callbacks.generation", "~callbacks.throughput"]


def search(corpus, cwd, *overrides):
    return subprocess.run(train_command(corpus, "hparams_search=lr", "hydra.sweep.dir=search", *FAST, *overrides,
                                        multirun=True),
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=TRAIN_ENV)


def studies(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT s.study_name, COUNT(t.trial_id) FROM studies s "
                                "JOIN trials t ON t.study_id = s.study_id GROUP BY s.study_name"))


@pytest.mark.slow
def test_each_arm_gets_its_own_study_and_a_rerun_continues(corpus, tmp_path):
    first = search(corpus, tmp_path, "attention.kv_groups=1,2", "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "search"
    assert studies(sweep / "optuna.db") == {"lr[attention.kv_groups=1]": 1, "lr[attention.kv_groups=2]": 1}

    again = search(corpus, tmp_path, "attention.kv_groups=1,2", "hydra.sweeper.n_trials=2")  # same sweep dir
    assert again.returncode == 0, again.stderr[-3000:]
    assert studies(sweep / "optuna.db") == {"lr[attention.kv_groups=1]": 2, "lr[attention.kv_groups=2]": 2}
    assert sorted(d.name for d in sweep.glob("*_kv*")) == ["0_mqa_h4_kv1_s1337", "1_gqa_h4_kv2_s1337",
                                                           "2_mqa_h4_kv1_s1337", "3_gqa_h4_kv2_s1337"]  # new job folders, none reused
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert [a["arm"] for a in results["arms"]] == [{"attention.kv_groups": 1}, {"attention.kv_groups": 2}]
    for arm in results["arms"]:
        assert arm["trials"]["complete"] == 2 and 1e-4 <= arm["best_params"]["optim.lr"] <= 1e-2
        assert (sweep / arm["best_run"] / "summary.json").is_file()
    # the seed is fixed: every trial trained with seed 1337, only the learning rate changed
    configs = [yaml.safe_load((d / ".hydra" / "config.yaml").read_text()) for d in sweep.glob("*_kv*")]
    assert {c["seed"] for c in configs} == {1337} and len({c["optim"]["lr"] for c in configs}) > 1
    rows = read_search_results(sweep)
    assert [(r["arm"], r["complete"]) for r in rows] == [("attention.kv_groups=1", 2), ("attention.kv_groups=2", 2)]
    assert "## Hyperparameter search: best per arm" in search_section(sweep)


@pytest.mark.slow
def test_diverged_trials_are_failed_and_the_study_goes_on(corpus, tmp_path):
    result = search(corpus, tmp_path, "optim.lr=1e30", "optim.warmup_steps=0",
                    "optim.weight_decay=interval(0.0,0.1)", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("training diverged: train/loss=nan") + result.stdout.count(
        "training diverged: train/loss=nan") >= 2  # one line per trial
    arm = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())["arms"][0]
    assert arm["trials"]["fail"] == 2 and arm["best_params"] is None


@pytest.mark.slow
def test_a_conflicting_rerun_is_refused_in_one_line(corpus, tmp_path):
    wd = "optim.weight_decay=interval(0.0,0.1)"
    first = search(corpus, tmp_path, "optim.lr=1e30", wd, "hydra.sweeper.n_trials=1")  # diverges at once: quick
    assert first.returncode == 0, first.stderr[-3000:]
    other = search(corpus, tmp_path, "optim.lr=1e30", wd, "hydra.sweeper.n_trials=1", "model.n_layer=1")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: study 'lr[all]' in sqlite:///")


@pytest.mark.slow
def test_an_unknown_search_is_one_line_from_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.train", "hparams_search=nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=TRAIN_ENV)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: hparams_search=nope is unknown; available: lr, lr_wd_warmup " \
                                    "(conf/hparams_search/)"


def test_without_the_search_extra_the_sweeper_names_the_pip_command(monkeypatch, capsys):
    from hydra_plugins.gpt_lightning_search.per_arm_sweeper import PerArmOptunaSweeper

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gpt_lightning.training.per_arm_sweeper")
    with pytest.raises(SystemExit) as e:
        PerArmOptunaSweeper(n_trials=1)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ('error: hparams_search needs the search extra (optuna is not '
                                               'installed): pip install -e ".[search]"')
