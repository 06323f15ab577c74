"""`python -m gpt_lightning.train` end to end, as a user runs it: subprocesses against a loopback-served corpus."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, GutenbergServer, gutenberg_text, portuguese_paragraphs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

BOOKS = [91001, 91002]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two generated books on a loopback server, and one data.root shared by the module's runs."""
    server = GutenbergServer(tmp_path_factory.mktemp("site"))
    for book in BOOKS:
        server.add_book(book, gutenberg_text(f"Livro {book}", portuguese_paragraphs(book, 120)))
    yield server, tmp_path_factory.mktemp("data")
    server.close()


def train(corpus, cwd: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    server, data_root = corpus
    cmd = [sys.executable, "-m", "gpt_lightning.train", *(["-m"] if multirun else []), "experiment=debug",
           f"data.base_url={server.base_url}", f"data.books=[{','.join(map(str, BOOKS))}]",
           f"data.root={data_root}", "data.pause=0", "trainer.accelerator=cpu",
           "callbacks.progress_bar.refresh_rate=0", *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def events(run_dir: Path) -> tuple[set[str], set[str]]:
    scalars, tensors = set(), set()
    for f in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        tensors |= set(acc.Tags()["tensors"])
    return scalars, tensors


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("launch")
    result = train(corpus, cwd, "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run", result


def test_twenty_steps_write_checkpoints_and_tensorboard(first_run):
    run_dir, result = first_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert global_step(run_dir / "checkpoints" / "best-step=20.ckpt") == 20
    scalars, tensors = events(run_dir)
    assert {"train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl", "train/tokens"} <= scalars
    assert any(t.startswith("lr-") for t in scalars)
    assert "samples/text_summary" in tensors
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"checkpoints: {run_dir.resolve() / 'checkpoints'}" in result.stderr + result.stdout


def test_samples_are_logged_to_the_console(first_run):
    _, result = first_run
    assert "samples at step 10:" in result.stderr + result.stdout
    assert "> Capítulo I" in result.stderr + result.stdout


def test_ckpt_path_last_continues_from_the_saved_step(first_run, corpus):
    run_dir, _ = first_run
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 20
    result = train(corpus, run_dir.parent, f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=30")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in result.stderr + result.stdout
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 30


def test_init_from_an_mha_checkpoint_pools_it_into_gqa(corpus, tmp_path):
    mha = train(corpus, tmp_path, "hydra.run.dir=mha", "attention=mha", "trainer.max_steps=10")
    assert mha.returncode == 0, mha.stderr[-3000:]
    ckpt = tmp_path / "mha" / "checkpoints" / "last.ckpt"
    gqa = train(corpus, tmp_path, "hydra.run.dir=gqa", "attention=gqa", "attention.kv_groups=1",
                f"init_from={ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert gqa.returncode == 0, gqa.stderr[-3000:]
    state = torch.load(tmp_path / "gqa" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["model"]["n_kv_groups"] == 1
    assert state["state_dict"]["model.transformer.h.0.attn.c_attn.weight"].shape == (64 + 2 * 16, 64)


def test_multirun_sweeps_kv_groups_into_separate_directories(corpus, tmp_path):
    result = train(corpus, tmp_path, "attention=gqa", "attention.kv_groups=1,2", "trainer.max_steps=4",
                   "trainer.val_check_interval=2", "hydra.sweep.dir=sweep", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_gqa_h4_kv1", "1_gqa_h4_kv2"]
    for job, kv in zip(jobs, (1, 2)):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["model"]["n_kv_groups"] == kv
        assert "val/loss" in events(job)[0]


@pytest.mark.parametrize("overrides, message", [
    (["attention=mha", "attention.kv_groups=2"], "error: attention=mha needs kv_groups = n_heads, got kv_groups=2"),
    (["attention.kv_groups=3"], "error: attention.kv_groups=3 does not divide attention.n_heads=4"),
    (["ckpt_path=nowhere.ckpt"], "error: ckpt_path=nowhere.ckpt: no such file"),
    (["init_from=nowhere.ckpt"], "error: init_from=nowhere.ckpt:"),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, overrides, message):
    result = train(corpus, tmp_path, "hydra.run.dir=bad", *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
