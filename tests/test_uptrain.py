"""The conversion study's settings (`uptrain.*`): refused in one line before any work, and the step plan."""

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.training import uptrain
from gpt_lightning.training.run_record import RunRecord

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def parent(tmp_path) -> str:
    """Only what the plan reads: a checkpoint's global_step (200 steps of an MHA parent)."""
    path = tmp_path / "parent.ckpt"
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {}, "global_step": 200}, path)
    return str(path)


@pytest.mark.parametrize("overrides, message", [
    (["uptrain.method=median", "init_from=x.ckpt"], "uptrain.method='median' is not a KV-head conversion method; "
                                                    "use one of mean, first, random"),
    (["uptrain.alpha=0.1"], "uptrain.alpha=0.1 needs a parent: set init_from=<MHA checkpoint>"),
    (["uptrain.alpha=-1", "init_from=x.ckpt"], "uptrain.alpha=-1.0 must be null or a number >= 0"),
    (["uptrain.method=scratch", "init_from=x.ckpt"], "uptrain.method=scratch is a conversion-study arm: set "
                                                     "uptrain.alpha"),
    (["uptrain.parent=train", "init_from=x.ckpt"], "uptrain.parent=train trains its own parent, but init_from"),
    (["uptrain.parent=yes"], "uptrain.parent='yes': use null, or train"),
    (["uptrain.alpha=0.1", "init_from=hf:gpt2"], "uptrain.alpha counts the parent's steps"),
    (["uptrain.optim={lrate: 1}"], "uptrain.optim has unknown key(s) lrate"),
    (["uptrain.optim={lr: 0}", "init_from=x.ckpt"], "uptrain.optim.lr=0 must be > 0"),
    (["uptrain.optim={min_lr: -1}", "init_from=x.ckpt"], "uptrain.optim.min_lr=-1 must be >= 0"),
    (["uptrain.optim={betas: [0.9, 1.5]}", "init_from=x.ckpt"], "uptrain.optim.betas=[0.9, 1.5] must be two numbers"),
    (["uptrain.optim={lr: fast}", "init_from=x.ckpt"], "uptrain.optim.lr='fast' must be a number, as optim.lr"),
])
def test_contradictory_settings_are_one_clear_line(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        uptrain.check(cfg(*overrides))


def test_every_study_method_passes_the_check():
    for method in ("mean", "first", "random", "scratch"):
        assert uptrain.check(cfg(f"uptrain.method={method}", "uptrain.alpha=0", "init_from=x.ckpt"))["method"] == method


@pytest.mark.parametrize("method, alpha, steps", [("mean", 0.05, 10), ("first", 0.1, 20), ("random", 0, 0),
                                                  ("scratch", 0, 200), ("scratch", 0.05, 210)])
def test_steps_follow_alpha_of_the_parents_steps(parent, method, alpha, steps):
    p = uptrain.plan(uptrain.check(cfg(f"uptrain.method={method}", f"uptrain.alpha={alpha}", f"init_from={parent}")),
                     parent)
    assert (p.parent_steps, p.max_steps, p.evaluate_only) == (200, steps, steps == 0)
    assert p.loads_weights == (method != "scratch")


def test_outside_the_study_init_from_trains_the_configured_steps(parent):
    p = uptrain.plan(uptrain.check(cfg(f"init_from={parent}", "uptrain.method=first")), parent)
    assert (p.method, p.alpha, p.max_steps, p.loads_weights, p.evaluate_only) == ("first", None, None, True, False)


def test_converted_models_take_the_uptraining_rate_and_scratch_keeps_optim(parent):
    study = cfg("experiment=uptrain_study", f"init_from={parent}")
    optim = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "weight_decay": 0.1}
    for method, lr in (("mean", 1e-4), ("scratch", 1e-3)):
        u = {**uptrain.check(study), "method": method}
        assert uptrain.optim_settings(optim, u, uptrain.plan(u, parent))["lr"] == lr


def test_the_parent_takes_the_jobs_overrides_but_not_the_study_keys(tmp_path):
    cmd = uptrain.parent_command(["experiment=uptrain_study_with_parent", "model.n_layer=2", "uptrain.method=first",
                                  "uptrain.alpha=0.05", "seed=3", "attention.kv_groups=1"], tmp_path / "parent")
    args = cmd[3:]
    assert args[:2] == ["experiment=uptrain_study_with_parent", "model.n_layer=2"]
    assert not any(a.startswith(("seed=", "uptrain.method=")) for a in args)
    assert {"uptrain.parent=null", "uptrain.alpha=null", "attention.kv_groups=${attention.n_heads}",
            "hydra.mode=RUN", f"hydra.run.dir={tmp_path / 'parent'}"} <= set(args)


def test_the_uptrain_gqa_preset_refuses_to_start_without_a_checkpoint():
    with pytest.raises(UserError, match="this preset converts an MHA checkpoint: pass init_from="):
        uptrain.check(cfg("experiment=uptrain_gqa"))
    assert uptrain.check(cfg("experiment=uptrain_gqa", "init_from=x.ckpt"))["needs_init_from"] is True


# --- the parent that uptrain.parent=train trains --------------------------------------------------------------------

def fake_parent_training(calls, outcome="complete"):
    """Stands in for the parent's subprocess: records the command, writes what a finished (or failed) parent leaves."""
    def run(cmd, cwd=None):
        calls.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if outcome == "complete":
            torch.save({"global_step": 200}, run_dir / "checkpoints" / "last.ckpt")
        RunRecord(kind="train", status=outcome, error=None if outcome == "complete" else "boom").save(
            run_dir / "summary.json")
        return SimpleNamespace(returncode=0 if outcome == "complete" else 1)
    return run


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv(uptrain.PARENT_ENV, raising=False)
    monkeypatch.setattr(uptrain, "_failed_parents", {}, raising=False)
    return tmp_path / "sweep"


def test_a_failed_parent_is_moved_aside_and_trained_again(home, monkeypatch):
    (home / "parent").mkdir(parents=True)
    RunRecord(kind="train", status="failed", error="boom").save(home / "parent" / "summary.json")
    calls = []
    monkeypatch.setattr(uptrain.subprocess, "run", fake_parent_training(calls))
    ckpt = uptrain.train_parent(home, ["experiment=uptrain_study_with_parent"], home)
    assert len(calls) == 1 and Path(ckpt) == home / "parent" / "checkpoints" / "last.ckpt" and Path(ckpt).is_file()
    assert RunRecord.load(home / "parent.failed-1" / "summary.json").error == "boom"  # kept, not deleted


def test_a_finished_parent_whose_checkpoint_is_gone_is_refused_not_retrained(home, monkeypatch):
    calls = []
    monkeypatch.setattr(uptrain.subprocess, "run", fake_parent_training(calls))
    ckpt = Path(uptrain.train_parent(home, [], home))
    ckpt.unlink()
    monkeypatch.delenv(uptrain.PARENT_ENV)  # a later run of the study
    with pytest.raises(UserError, match=r"finished .* but .*last.ckpt is missing \(deleted, or the parent ran with checkpointing off\): put it back, or move"):
        uptrain.train_parent(home, [], home)
    assert len(calls) == 1 and (home / "parent" / "summary.json").is_file()  # nothing moved, nothing trained
    assert not (home / "parent.failed-1").exists()


def test_a_finished_parent_is_reused(home, monkeypatch):
    calls = []
    monkeypatch.setattr(uptrain.subprocess, "run", fake_parent_training(calls))
    first = uptrain.train_parent(home, [], home)
    monkeypatch.delenv(uptrain.PARENT_ENV)  # a rerun of the study: a new process
    assert uptrain.train_parent(home, [], home) == first and len(calls) == 1


def test_an_interrupted_parent_is_resumed(home, monkeypatch):
    (home / "parent" / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 80}, home / "parent" / "checkpoints" / "last.ckpt")  # SIGTERM: a checkpoint, no record
    calls = []
    monkeypatch.setattr(uptrain.subprocess, "run", fake_parent_training(calls))
    uptrain.train_parent(home, [], home)
    assert calls[0][-1] == "ckpt_path=last" and not (home / "parent.failed-1").exists()


def test_a_parent_that_fails_is_tried_once_per_process(home, monkeypatch):
    calls = []
    monkeypatch.setattr(uptrain.subprocess, "run", fake_parent_training(calls, outcome="failed"))
    for _ in range(2):  # two jobs of one sweep
        with pytest.raises(UserError, match="training the MHA parent failed"):
            uptrain.train_parent(home, [], home)
    assert len(calls) == 1


@pytest.fixture
def hydra_job():
    """Set HydraConfig as a job of this composed config would see it."""
    from hydra.core.hydra_config import HydraConfig

    def job(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=CONF):
            HydraConfig.instance().set_config(compose("config", overrides=list(overrides), return_hydra_config=True))
    yield job
    HydraConfig.instance().cfg = None


def test_resuming_an_arm_of_the_study_with_parent_reuses_that_parent(hydra_job, tmp_path, monkeypatch):
    from gpt_lightning.train import resume_command

    arm = ("experiment=uptrain_study_with_parent", "uptrain.method=first", "uptrain.alpha=0.1")
    hydra_job(*arm)
    parent = str(tmp_path / "my sweep" / "parent" / "checkpoints" / "last.ckpt")
    words = shlex.split(resume_command(tmp_path / "sweep" / "1_first_a0.1", trained_parent=parent))
    assert words[:2] == ["env", f"{uptrain.PARENT_ENV}={parent}"]  # told through the environment, in any shell
    args = words[2:]
    assert args[-3:] == ["ckpt_path=last", f"hydra.run.dir={tmp_path / 'sweep' / '1_first_a0.1'}", "hydra.mode=RUN"]
    resumed = cfg(*(a for a in args[3:] if not a.startswith("hydra.")))
    # The same config as the arm's first run (compare groups by it), but for ckpt_path
    assert {**OmegaConf.to_container(resumed), "ckpt_path": None} == {**OmegaConf.to_container(cfg(*arm)),
                                                                     "ckpt_path": None}
    assert resumed.ckpt_path == "last"
    # ... and that run takes the parent from the environment instead of training one in its own folder
    monkeypatch.setenv(uptrain.PARENT_ENV, parent)
    monkeypatch.setattr(uptrain.subprocess, "run", lambda *a, **k: pytest.fail("trained a new parent"))
    assert uptrain.train_parent(tmp_path / "sweep" / "1_first_a0.1", args[3:], tmp_path) == parent


def test_a_sweep_job_resumed_without_the_parent_variable_finds_its_sweeps_parent(hydra_job, tmp_path):
    from gpt_lightning.train import study_home

    hydra_job("experiment=uptrain_study_with_parent", "uptrain.method=first", "uptrain.alpha=0.1", "hydra.mode=RUN")
    sweep, arm = tmp_path / "sweep", tmp_path / "sweep" / "1_first_a0.1"
    arm.mkdir(parents=True)
    assert study_home(arm, resuming=True) == arm  # no trained parent beside it: the run's own folder
    (sweep / "parent" / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 200}, sweep / "parent" / "checkpoints" / "last.ckpt")
    RunRecord(kind="train", status="complete").save(sweep / "parent" / "summary.json")
    assert study_home(arm, resuming=True) == sweep  # the resumed job reuses the sweep's parent
    assert study_home(arm, resuming=False) == arm  # a fresh single run trains its own
    (arm / "parent").mkdir()
    assert study_home(arm, resuming=True) == arm  # a single run that trained its own parent keeps it


def test_a_resume_command_quotes_a_path_hydra_would_misread(hydra_job, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gpt_lightning.train import override_value, resume_command

    hydra_job("experiment=uptrain_study_with_parent")
    parser = OverridesParser.create()
    for name in ("a=b", "ação", "~home", "it's here", "plain-name_1.2+x@y:z"):
        run_dir = tmp_path / name
        args = shlex.split(resume_command(run_dir))
        given = next(a for a in args if a.startswith("hydra.run.dir="))
        assert parser.parse_override(given).value() == str(run_dir), name
    assert override_value("outputs/runs/a-1.2") == "outputs/runs/a-1.2"  # plain paths stay readable
