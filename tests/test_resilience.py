"""Through failures and across processes: DDP on 2 CPU processes, multirun + DDP, kill -9 and SIGTERM,
refused checkpoints, determinism, SLURM launcher config."""

import hashlib
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN_ENV, run_train, train_command
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_lightning.training.run_record import RunRecord

pytestmark = pytest.mark.slow  # subprocess runs of the real entry points


def command(corpus, *overrides, multirun=False):
    return train_command(corpus, "~callbacks.generation", *overrides, multirun=multirun)


def train(corpus, cwd, *overrides, multirun=False):
    return run_train(corpus, cwd, "~callbacks.generation", *overrides, multirun=multirun)


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step, from every event file of the run."""
    out = {}
    for f in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The reference: one process, global batch 8, a loss logged every step."""
    cwd = tmp_path_factory.mktemp("single")
    r = train(corpus, cwd, "hydra.run.dir=run", "data.batch_size=8", "trainer.max_steps=30",
              "trainer.log_every_n_steps=1", "trainer.val_check_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "run"


def test_same_seed_same_loss_at_every_step(corpus, single, tmp_path):
    r = train(corpus, tmp_path, "hydra.run.dir=again", "data.batch_size=8", "trainer.max_steps=30",
              "trainer.log_every_n_steps=1", "trainer.val_check_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    first, again = losses(single), losses(tmp_path / "again")
    assert len(first) >= 29 and first == again


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, single, tmp_path):
    r = train(corpus, tmp_path, "hydra.run.dir=ddp", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "data.batch_size=4", "trainer.max_steps=30", "trainer.log_every_n_steps=1",
              "trainer.val_check_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, ref = losses(tmp_path / "ddp"), losses(single)
    assert sorted(ddp) == sorted(ref)
    worst = max(abs(ddp[s] - ref[s]) for s in ref)
    assert worst < 2e-3, f"2-process DDP loss differs from 1 process by up to {worst}"
    # rank 0 alone wrote the run: one directory, one set of checkpoints, no per-rank Hydra folders
    assert step_of(tmp_path / "ddp" / "checkpoints" / "last.ckpt") == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_multirun_with_ddp_keeps_one_directory_per_job(corpus, tmp_path):
    r = train(corpus, tmp_path, "attention.kv_groups=1,2", "trainer=ddp", "trainer.accelerator=cpu",
              "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
              "hydra.sweep.dir=sweep", multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_mqa_h4_kv1_s1337", "1_gqa_h4_kv2_s1337"]
    for job in jobs:
        assert step_of(tmp_path / "sweep" / job / "checkpoints" / "last.ckpt") == 4


def test_kill_9_then_resume_continues_the_same_curve(corpus, single, tmp_path):
    proc = subprocess.Popen(command(corpus, "hydra.run.dir=run", "data.batch_size=8", "trainer.max_steps=30",
                                    "trainer.log_every_n_steps=1", "trainer.val_check_interval=10"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TRAIN_ENV)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = step_of(last)
    assert 10 <= saved < 30, "the run must be killed between checkpoints"
    r = train(corpus, tmp_path, "hydra.run.dir=run", "ckpt_path=last", "data.batch_size=8", "trainer.max_steps=30",
              "trainer.log_every_n_steps=1", "trainer.val_check_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_of(last) == 30
    resumed, ref = losses(tmp_path / "run"), losses(single)
    after = [s for s in ref if s > saved]
    assert after and all(abs(resumed[s] - ref[s]) < 1e-5 for s in after), \
        {s: (resumed.get(s), ref[s]) for s in after}


def test_sigterm_writes_a_checkpoint_before_exit(corpus, tmp_path):
    proc = subprocess.Popen(command(corpus, "hydra.run.dir=run", "trainer.max_steps=100000",
                                    "trainer.val_check_interval=5"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TRAIN_ENV)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it train past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # the scheduler sees a preempted job
    match = re.search(r"SIGTERM: saved (\S+) at step (\d+)", out)
    assert match, out[-3000:]
    saved = int(match[2])
    assert Path(match[1]) == last.resolve() and step_of(last) == saved > 0
    end = (saved // 5 + 2) * 5  # a validation step, where last.ckpt is written again
    r = train(corpus, tmp_path, "hydra.run.dir=run", "ckpt_path=last", f"trainer.max_steps={end}",
              "trainer.val_check_interval=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restored all states" in r.stdout + r.stderr and step_of(last) == end


@pytest.mark.parametrize("kind", ["foreign", "truncated", "other_shape"])
def test_a_bad_resume_checkpoint_is_refused_and_left_untouched(corpus, single, tmp_path, kind):
    bad = tmp_path / "bad.ckpt"
    good = (single / "checkpoints" / "last.ckpt").read_bytes()
    extra = []
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, bad)
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(good)
        extra = ["attention.kv_groups=1"]
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    r = train(corpus, tmp_path, "hydra.run.dir=run", f"ckpt_path={bad}", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(bad) in line
    assert ("another model shape" in line) if kind == "other_shape" else ("not a gpt_lightning checkpoint" in line)
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest


def test_more_gpus_than_exist_is_one_clear_line(corpus, tmp_path):
    r = train(corpus, tmp_path, "hydra.run.dir=run", "trainer.accelerator=gpu", "trainer.devices=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: trainer.accelerator=gpu but no CUDA GPU")


def test_slurm_launcher_gets_the_node_and_task_counts():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is part of dev")
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8",
            "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.additional_parameters.signal == "USR1@120"
    assert (cfg.trainer.num_nodes, cfg.trainer.strategy) == (2, "ddp")


# ---- issue 12: signals, memory, moved checkpoints, sweeps with bad jobs, typed configs ----

def test_sigint_checkpoints_at_the_step_boundary_and_prints_the_resume_command(corpus, tmp_path):
    import shlex
    import sys

    proc = subprocess.Popen(command(corpus, "hydra.run.dir=run", "trainer.max_steps=100000",
                                    "trainer.val_check_interval=5"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TRAIN_ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C in a terminal
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # past the periodic checkpoint
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    saved = re.search(r"SIGINT: saved (\S+) at step (\d+)", out)
    assert saved and Path(saved[1]) == last.resolve() and step_of(last) == int(saved[2]) > 5
    resume = re.search(r"stopped by SIGINT at step \d+; last checkpoint: \S+ \(step \d+\); resume with: (.+)", out)
    assert resume, out[-3000:]
    args = shlex.split(resume[1])
    assert args[:3] == ["python", "-m", "gpt_lightning.train"] and args[-2:] == ["ckpt_path=last",
                                                                                f"hydra.run.dir={tmp_path / 'run'}"]
    stale = last.parent / ".last.ckpt.abcd1234.partial"  # what a save killed mid-write leaves
    stale.write_bytes(b"x" * 1000)
    end = int(saved[2]) + 2
    r = subprocess.run([sys.executable, *[a for a in args[1:] if not a.startswith("trainer.max_steps=")],
                        f"trainer.max_steps={end}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=TRAIN_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restored all states" in r.stdout + r.stderr and step_of(last) == end
    assert not stale.exists()


def test_a_shape_that_cannot_fit_in_memory_is_refused_before_any_work(corpus, tmp_path):
    r = train(corpus, tmp_path, "hydra.run.dir=run", "model.block_size=10000000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.block_size=10000000 with data.batch_size=8") and "GiB" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_a_checkpoint_whose_run_was_moved_tracks_best_and_last_in_the_new_run(corpus, tmp_path):
    r = train(corpus, tmp_path, "hydra.run.dir=orig", "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "orig").rename(tmp_path / "moved")  # best_model_path inside the checkpoint points into orig/
    moved = tmp_path / "moved" / "checkpoints" / "last.ckpt"
    finished = train(corpus, tmp_path, "hydra.run.dir=again", f"ckpt_path={moved}", "trainer.max_steps=4",
                     "trainer.val_check_interval=2")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "FileNotFoundError" not in finished.stderr
    assert RunRecord.load(tmp_path / "again" / "summary.json").status == "complete"
    more = train(corpus, tmp_path, "hydra.run.dir=more", f"ckpt_path={moved}", "trainer.max_steps=6",
                 "trainer.val_check_interval=2")
    assert more.returncode == 0, more.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "more" / "checkpoints").iterdir()) == ["best-step=6.ckpt", "last.ckpt"]
    assert step_of(tmp_path / "more" / "checkpoints" / "last.ckpt") == 6
    assert sorted(p.name for p in (tmp_path / "moved" / "checkpoints").iterdir()) == ["best-step=4.ckpt", "last.ckpt"]


def test_a_sweep_with_an_invalid_job_runs_nothing_and_lists_it(corpus, tmp_path):
    r = train(corpus, tmp_path, "attention.kv_groups=3,1", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "hydra.sweep.dir=sweep", multirun=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: 1 of 2 sweep jobs are invalid, nothing was run (fix them, or add sweep.skip_invalid=true to run the "
        "1 valid one(s)):",
        "  #0 attention.kv_groups=3: attention.kv_groups=3 does not divide attention.n_heads=4; pick a divisor of 4"]
    assert not (tmp_path / "sweep").exists()


def test_skip_invalid_runs_the_valid_jobs_and_records_the_invalid_one(corpus, tmp_path):
    r = train(corpus, tmp_path, "attention.kv_groups=3,1", "sweep.skip_invalid=true", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "hydra.sweep.dir=sweep", multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: skipping 1 invalid job(s) of 2 (sweep.skip_invalid=true):" in r.stderr
    assert RunRecord.load(tmp_path / "sweep" / "1_mqa_h4_kv1_s1337" / "summary.json").status == "complete"
    skipped = RunRecord.load(tmp_path / "sweep" / "0_gqa_h4_kv3_s1337" / "summary.json")
    assert (skipped.status, skipped.error) == ("failed", "attention.kv_groups=3 does not divide attention.n_heads=4; "
                                                         "pick a divisor of 4")


def test_a_job_that_fails_at_run_time_is_recorded_and_the_sweep_goes_on(corpus, tmp_path):
    r = train(corpus, tmp_path, "ckpt_path=nowhere.ckpt,null", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "hydra.sweep.dir=sweep", multirun=True)
    assert r.returncode == 1, r.stderr[-3000:]
    failed, done = sorted((tmp_path / "sweep").glob("*_gqa_h4_kv2_s1337"))
    record = RunRecord.load(failed / "summary.json")
    assert (record.status, record.error) == ("failed", "ckpt_path=nowhere.ckpt: no such file; pass an existing "
                                                       ".ckpt, or ckpt_path=last")
    assert "error: ckpt_path=nowhere.ckpt: no such file" in (failed / "train.log").read_text()
    assert RunRecord.load(done / "summary.json").status == "complete"  # the sweep went on
    assert "error: 1 of 2 sweep jobs failed" in r.stderr and f"#0 ckpt_path=nowhere.ckpt" in r.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "error: Error merging override optim.lr=abc: Value 'abc' of type 'str' could not be converted"),
    ("seed=abc", "error: Error merging override seed=abc: Value 'abc' of type 'str' could not be converted"),
    ("model.typo=1", "error: Could not override 'model.typo': Key 'typo' not in 'ModelConfig'"),
    ("+foo=1", "error: unknown config key foo: not in the schema"),
    ("trainer.max_steps=0", "error: trainer.max_steps=0 must be >= 1"),
    ("data.block_size=32", "error: data.block_size=32 differs from model.block_size=64"),
])
def test_typed_garbage_on_the_command_line_is_one_line(corpus, tmp_path, override, message):
    r = train(corpus, tmp_path, "hydra.run.dir=run", override)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().startswith(message)
    if not override.startswith(("+", "trainer", "data")):  # refused while composing: no run directory at all
        assert not (tmp_path / "run").exists()
    else:  # refused by check_config: the run's record and log say why
        assert RunRecord.load(tmp_path / "run" / "summary.json").status == "failed"
        assert r.stderr.strip() in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("entry, override, message", [
    ("generate", "seed=abc", "error: Error merging override seed=abc: Value 'abc' of type 'str' could not be"),
    ("generate", "temperature=abc", "error: Error merging override temperature=abc: Value 'abc' of type 'str'"),
    ("evaluate", "+decode.contxts=[64]", "error: unknown config key decode.contxts"),
    ("bench", "bench.steps=0", "error: bench.steps=0 must be >= 1"),
])
def test_generate_evaluate_and_bench_refuse_bad_values_in_one_line(tmp_path, entry, override, message):
    import sys

    extra = ["experiment=debug"] if entry == "bench" else ["ckpt_path=x.ckpt"]
    r = subprocess.run([sys.executable, "-m", f"gpt_lightning.{entry}", *extra, override], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=TRAIN_ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().startswith(message)
    assert list(tmp_path.iterdir()) == []  # no bench.json, no run directory


def test_prepare_writes_no_run_directory(fixture_corpus, tmp_path):
    import sys

    base_url, ids = fixture_corpus
    r = subprocess.run([sys.executable, "-m", "gpt_lightning.prepare", f"data.base_url={base_url}",
                        f"data.books=[{ids[0]}]", "data.root=corpus", "data.encoding=bytes", "data.pause=0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=TRAIN_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no outputs/, .hydra/ or prepare.log
