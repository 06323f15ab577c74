"""SIGTERM/SIGINT: the first stops at the next step boundary, the second at once, even inside a long C++ op."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
from conftest import REPO
from lightning.pytorch.trainer.states import RunningStage, TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt_lightning.training.signals import SignalGuard


def fake_trainer(stage=RunningStage.TRAINING):
    return SimpleNamespace(state=SimpleNamespace(status=TrainerStatus.RUNNING, stage=stage),
                           _signal_connector=SimpleNamespace(received_sigterm=False),
                           strategy=SimpleNamespace(launcher=None), callbacks=[])


def in_training_loop(guard):
    """What Lightning's fit loop tells the guard's LoopWatch when training starts."""
    guard.watch.on_train_start(guard.trainer, None)
    return guard


def real_trainer(max_steps=50, callbacks=()):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                     enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks))


def wait_for(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_lightning_stop_flag_is_the_one_the_guard_sets():
    """Lightning private API the guard relies on: the connector's flag is what Trainer.received_sigterm reads."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.received_sigterm is False
    trainer._signal_connector.received_sigterm = True
    assert trainer.received_sigterm is True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_first_signal_inside_a_step_asks_lightning_to_stop_at_the_boundary(signum, capfd):
    trainer = fake_trainer()
    with SignalGuard(trainer, None, "python -m gpt_lightning.train ckpt_path=last hydra.run.dir=RUN") as guard:
        in_training_loop(guard)
        os.kill(os.getpid(), signum)  # SIGINT no longer raises KeyboardInterrupt in the middle of a step
        assert wait_for(lambda: trainer._signal_connector.received_sigterm and guard.count == 1)
    assert guard.first == signum and signal.getsignal(signum) is not guard._handle  # handlers restored
    name = signal.Signals(signum).name
    assert f"{name} received: finishing this step, then saving last.ckpt" in capfd.readouterr().err


class SignalsItself:
    """A dataset whose items are fetched while Ctrl-C reaches the worker process too (the whole process group)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return i


def test_a_signal_to_a_forked_dataloader_worker_does_not_count_in_the_parent():
    from torch.utils.data import DataLoader

    with SignalGuard(fake_trainer(), None, "resume") as guard:
        in_training_loop(guard)
        # The worker must not die of it (the parent would fail on the lost worker) nor count it in the parent
        loader = DataLoader(SignalsItself(), batch_size=1, num_workers=1, multiprocessing_context="fork")
        assert [int(b) for b in loader] == [0, 1, 2, 3]
        time.sleep(0.3)
        assert guard.count == 0 and not guard.trainer._signal_connector.received_sigterm


def test_a_rank_forked_by_ddp_fork_stops_its_own_loop_and_the_parent_does_not_count_it():
    read, write = os.pipe()
    with SignalGuard(fake_trainer(), None, "resume") as guard:
        in_training_loop(guard)
        pid = os.fork()
        if pid == 0:  # a training rank (not a DataLoader worker): it handles its signals as its own guard
            try:
                guard.watch.on_train_start(guard.trainer, None)  # its own fit loop starts
                os.kill(os.getpid(), signal.SIGTERM)
                ok = wait_for(lambda: guard.trainer._signal_connector.received_sigterm and guard.count == 1)
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        time.sleep(0.3)
        assert os.read(read, 1) == b"1" and os.waitstatus_to_exitcode(status) == 0
        assert guard.count == 0 and not guard.trainer._signal_connector.received_sigterm
    os.close(read)
    os.close(write)


def test_a_first_signal_outside_lightnings_loops_stops_there():
    with pytest.raises(SIGTERMException):
        with SignalGuard(fake_trainer(stage=None), None, "resume"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # data preparation, say: nothing polls Lightning's flag here


def test_a_first_signal_during_data_preparation_stops_there_not_after_training():
    """Trainer.fit reports stage=TRAINING already in prepare_data, and Lightning resets its stop flag before the
    loop: a flag set there was lost and the run trained to the end."""
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    class SignalledWhilePreparing(BoringDataModule):
        def prepare_data(self):
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption during a download, say
            time.sleep(0.5)

    trainer = real_trainer()
    with SignalGuard(trainer, None, "resume") as guard:
        with pytest.raises(SIGTERMException):
            trainer.fit(BoringModel(), datamodule=SignalledWhilePreparing())
    assert guard.first == signal.SIGTERM and trainer.global_step == 0
    assert guard.watch not in trainer.callbacks


def test_a_signal_before_training_starts_writes_no_checkpoint(tmp_path):
    """The weights before the loop are not this run's training state (a resumed run's last.ckpt must survive)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from gpt_lightning.training.callbacks import CheckpointOnSigterm

    class SignalledWhilePreparing(BoringDataModule):
        def prepare_data(self):
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = real_trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path), CheckpointOnSigterm()])
    with SignalGuard(trainer, str(tmp_path), "resume"):
        with pytest.raises(SIGTERMException):
            trainer.fit(BoringModel(), datamodule=SignalledWhilePreparing())
    assert list(tmp_path.iterdir()) == []


def test_a_first_signal_in_a_real_training_loop_stops_at_the_step_boundary():
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class SignalAtStep3(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = real_trainer(callbacks=[SignalAtStep3()])
    with SignalGuard(trainer, None, "resume"):
        with pytest.raises(SIGTERMException):
            trainer.fit(BoringModel())
    assert trainer.global_step == 3


# A step stuck in one long C++ op (a matmul: the GIL is released, Python runs no handler until it returns).
STUCK = textwrap.dedent("""
    import sys, torch
    from types import SimpleNamespace
    from lightning.pytorch.trainer.states import RunningStage, TrainerStatus
    from gpt_lightning.training.checkpoint_io import AtomicCheckpointIO
    from gpt_lightning.training.signals import SignalGuard
    torch.set_num_threads(1)
    trainer = SimpleNamespace(state=SimpleNamespace(status=TrainerStatus.RUNNING, stage=RunningStage.TRAINING),
                              _signal_connector=SimpleNamespace(received_sigterm=False),
                              strategy=SimpleNamespace(launcher=None), callbacks=[])
    with SignalGuard(trainer, sys.argv[1], "python -m gpt_lightning.train ckpt_path=last hydra.run.dir=RUN") as g:
        g.watch.on_train_start(trainer, None)  # inside Lightning's training loop
        AtomicCheckpointIO().save_checkpoint({"global_step": 7}, sys.argv[1] + "/last.ckpt")
        a = torch.randn(8192, 8192)
        print("ready", flush=True)
        for _ in range(100):
            a @ a
    print("the step finished", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_exits_at_once_even_inside_a_long_op(tmp_path, first, second):
    (tmp_path / "stuck.py").write_text(STUCK)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "stuck.py"), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # inside the first matmul (one takes seconds on one thread)
    proc.send_signal(first)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(second)
    out, err = proc.communicate(timeout=120)
    elapsed = time.time() - sent
    assert proc.returncode == 128 + second, err
    assert elapsed < 3, f"took {elapsed:.1f} s to stop"
    assert "the step finished" not in out
    name = signal.Signals(second).name
    assert f"{name} again: stopping at once, without saving. Last checkpoint: {tmp_path}/last.ckpt (step 7)" in err
    assert "Resume with: python -m gpt_lightning.train ckpt_path=last hydra.run.dir=RUN" in err
