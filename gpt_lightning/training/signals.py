"""SIGTERM and SIGINT during training: the first stops at the next step boundary with a checkpoint, the second at once.

- First signal (either): Lightning's stop flag is set, so the step in flight finishes, `CheckpointOnSigterm` writes
  `last.ckpt` and `train` exits with 128 + the signal (143 for SIGTERM, 130 for SIGINT), printing the resume
  command. Outside Lightning's loops (data preparation, model setup) there is no step to finish: it stops there.
- Second signal: exits at once with 128 + that signal, after saying where the last complete checkpoint is.
  A step may sit for minutes inside one C++ op, during which Python runs no signal handler. The C-level handler
  still writes the signal number to the wakeup fd, so a watchdog thread reading it acts while the main thread
  is stuck (torch ops release the GIL). Checkpoints are written atomically (`checkpoint_io.py`), so stopping
  in the middle of a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import get_worker_info

from gpt_lightning.training.checkpoint_io import AtomicCheckpointIO

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_active: "SignalGuard | None" = None


def first_signal() -> int | None:
    """The signal that asked the current run to stop, if one did (read by `CheckpointOnSigterm`)."""
    return _active.first if _active is not None else None


def stopped_outside_the_loop() -> bool:
    """Whether the guard stopped the run where no Lightning loop ran (data preparation, setup, restoring): there
    is no training state to save (read by `CheckpointOnSigterm`)."""
    return _active is not None and _active.raised_outside


class Stopped(SystemExit):
    """Training stopped by a signal at a step boundary; the exit status is 128 + the signal (143, 130).
    A SystemExit, so a multirun stops too (a preempted sweep is not a failed job)."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


class LoopWatch(L.Callback):
    """Tells its guard when a Lightning loop polls the stop flag: from the start of a loop (after Lightning's
    `register_signal_handlers` has reset the flag) to its end. Outside (data preparation, setup, restoring a
    checkpoint, between `fit` and `test`) the flag would be lost: Trainer.fit reports stage=TRAINING from before
    its prepare_data, and the reset discards a flag set there."""

    def __init__(self, guard: "SignalGuard"):
        self.guard = guard

    def _start(self, trainer, pl_module) -> None:
        self.guard.in_loop = True
        self.guard.in_child = False  # a loop runs in this process: a training rank (ddp_fork's), not a worker

    def _end(self, trainer, pl_module, *exception) -> None:
        self.guard.in_loop = False

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _start
    on_train_end = on_test_end = on_predict_end = on_exception = _end

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validation inside fit: the fit loop goes on polling
            self._end(trainer, pl_module)


class SignalGuard:
    """`with SignalGuard(trainer, checkpoint_dir, resume_command):` around `trainer.fit` and `trainer.test`.
    It adds a `LoopWatch` to the trainer's callbacks while active."""

    def __init__(self, trainer, checkpoint_dir: str | None, resume_command: str):
        self.trainer, self.checkpoint_dir, self.resume_command = trainer, checkpoint_dir, resume_command
        self.first: int | None = None
        self.count = 0
        self.in_loop = False  # set by LoopWatch: a Lightning loop polls the stop flag
        self.in_child = False  # forked from the guarded process, and no Lightning loop has started here since
        self.raised_outside = False  # stopped by raising SIGTERMException outside Lightning's loops
        self.watch = LoopWatch(self)
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._old_handlers: dict = {}

    # -- install / remove --
    def __enter__(self) -> "SignalGuard":
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self
        self.trainer.callbacks.append(self.watch)
        # A signal ignored on purpose (nohup, a shell's background job) stays ignored.
        self._old_handlers = {s: signal.getsignal(s) for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        if not self._old_handlers:
            return self
        for s in self._old_handlers:
            signal.signal(s, self._handle)
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        if old_fd == -1:
            self._watchdog = threading.Thread(target=self._watch, name="signal-watchdog", daemon=True)
            self._watchdog.start()
        else:  # someone else reads the wakeup fd: leave it to them, count in the Python handler
            signal.set_wakeup_fd(old_fd)
        _active = self
        AtomicCheckpointIO.last_saved = None  # a multirun's previous job saved elsewhere
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self.watch in self.trainer.callbacks:
            self.trainer.callbacks.remove(self.watch)
        if not self._old_handlers:
            return
        _active = None
        if self._watchdog is not None:
            signal.set_wakeup_fd(-1)
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        os.close(self._w)  # the watchdog reads EOF and ends
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        os.close(self._r)

    # -- signals --
    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in SIGNALS:
                    self._count(signum)

    def _handle(self, signum, frame) -> None:
        """Python-level handler (main thread, between bytecodes): ask Lightning to stop after this step."""
        # A DataLoader worker (also while it starts, before get_worker_info is set): the parent acts, and raising
        # here would kill the worker under it. A rank that strategy=ddp_fork forked acts once its loop started.
        if self.in_child or get_worker_info() is not None:
            return
        if self._watchdog is None:
            self._count(signum)
        trainer = self.trainer
        if self.in_loop and trainer.state.status == TrainerStatus.RUNNING:
            # Lightning private API (Trainer.received_sigterm has no setter); pinned by tests/test_signals.py.
            # Its loops raise SIGTERMException at the next step boundary (on every DDP rank, via a broadcast).
            trainer._signal_connector.received_sigterm = True
        else:  # no Lightning loop is polling the flag (data preparation, setup): stop here
            self.raised_outside = True
            raise SIGTERMException()

    def _count(self, signum: int) -> None:
        with self._lock:
            self.count += 1
            if self.first is None:
                self.first = signum
            n = self.count
        name = signal.Signals(signum).name
        if n == 1:
            doing = "finishing this step, then saving last.ckpt and stopping" if self.in_loop else \
                "stopping now (no training step is running)"
            _say(f"\n{name} received: {doing} (send {name} again to stop at once)\n")
            return
        _say(f"\n{name} again: stopping at once, without saving. Last checkpoint: {self.last_checkpoint()}. "
             f"Resume with: {self.resume_command}\n")
        launcher = getattr(self.trainer.strategy, "launcher", None)
        for proc in getattr(launcher, "procs", []):  # DDP ranks started by this process
            try:
                proc.kill()
            except OSError:
                pass
        os._exit(128 + signum)

    def last_checkpoint(self) -> str:
        saved = AtomicCheckpointIO.last_saved
        if saved is not None:
            path, step, _ = saved
            return f"{path} (step {step})" if step is not None else path
        last = Path(self.checkpoint_dir or "", "last.ckpt")
        if self.checkpoint_dir and last.is_file():
            return f"{last} (written before this process started)"
        return "none (nothing to resume: start again without ckpt_path)"


def _forget_in_child() -> None:
    """A forked child inherits the wakeup fd, whose reader (the watchdog thread) stays in the parent: its signals
    (Ctrl-C reaches the whole process group) would count there as a second signal. The child keeps the handler and
    counts in it: a DataLoader worker ignores them (the parent stops the run and its workers); a rank that
    `strategy=ddp_fork` forked stops its own training loop once it runs one (LoopWatch clears `in_child`), as a
    rank started by the `ddp` strategy would."""
    if _active is not None:
        _active.in_child = True
    if _active is not None and _active._watchdog is not None:
        _active._watchdog = None  # the thread is the parent's: this process counts in its Python handler
        _active._lock = threading.Lock()  # the parent's watchdog may have held it at the fork
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from a thread other than the main one
            pass


os.register_at_fork(after_in_child=_forget_in_child)


def _say(message: str) -> None:
    """Write to stderr without Python's buffered streams (safe from a signal handler or another thread)."""
    try:
        os.write(2, message.encode("utf-8", "replace"))
    except OSError:
        pass
