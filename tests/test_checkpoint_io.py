"""Checkpoints are atomic wherever $TMPDIR is: a kill -9 during a save leaves the old file whole and, after the next
start, no temp file anywhere."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from gpt_lightning.training.checkpoint_io import (AtomicCheckpointIO, partial_checkpoints,
                                                  remove_partial_checkpoints)

# Saves one checkpoint, says "ready", then rewrites last.ckpt in a loop until killed.
SAVER = textwrap.dedent("""
    import sys, torch
    from gpt_lightning.training.checkpoint_io import AtomicCheckpointIO
    directory, megabytes = sys.argv[1], int(sys.argv[2])
    io = AtomicCheckpointIO()
    payload = torch.ones(megabytes * 2**20 // 4)
    io.save_checkpoint({"global_step": 0, "payload": payload}, f"{directory}/last.ckpt")
    print("ready", flush=True)
    step = 1
    while True:
        io.save_checkpoint({"global_step": step, "payload": payload * step}, f"{directory}/last.ckpt")
        step += 1
""")


def other_filesystem_tmpdir(tmp_path: Path) -> Path:
    """A $TMPDIR on another filesystem than tmp_path (where the checkpoints go): /dev/shm."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path to put $TMPDIR there")
    return Path(tempfile.mkdtemp(dir=shm, prefix="tmpdir-"))


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["temp_file_appears", "temp_file_half_written"])
def test_kill_9_during_a_save_with_tmpdir_on_another_filesystem(tmp_path, moment):
    tmpdir = other_filesystem_tmpdir(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (tmp_path / "saver.py").write_text(SAVER)
    megabytes = 64
    proc = subprocess.Popen([sys.executable, str(tmp_path / "saver.py"), str(checkpoints), str(megabytes)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        last = checkpoints / "last.ckpt"
        full = last.stat().st_size
        deadline, why = time.time() + 120, None
        while why is None and time.time() < deadline:
            if any(p.name != "torchinductor_root" for p in tmpdir.iterdir()):
                why = "a file appeared in $TMPDIR"  # the old TorchCheckpointIO writes its temp file there
            elif last.stat().st_size < full:
                why = "last.ckpt shrank"  # ... then copies it into last.ckpt across filesystems
            else:
                partial = partial_checkpoints(checkpoints)
                if partial and (moment == "temp_file_appears" or partial[0].stat().st_size > full // 2):
                    why = moment
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert why == moment, f"killed because {why}"
    saved = torch.load(last, map_location="cpu", weights_only=True)  # the previous checkpoint, whole
    assert last.stat().st_size == full and saved["payload"].numel() == megabytes * 2**20 // 4
    assert torch.all(saved["payload"] == max(saved["global_step"], 1))
    assert [p.name for p in tmpdir.iterdir() if p.name != "torchinductor_root"] == []
    assert len(partial_checkpoints(checkpoints)) == 1  # the killed save's temp file, beside the checkpoint ...
    remove_partial_checkpoints(checkpoints)  # ... removed when the next run starts (train.py does this)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]


def test_a_save_writes_nothing_in_tmpdir_and_honours_the_umask(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(4)}, tmp_path / "ck" / "last.ckpt")
    finally:
        os.umask(old)
    assert list(tmpdir.iterdir()) == [] and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.ckpt"]
    assert (tmp_path / "ck" / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert AtomicCheckpointIO.last_saved[:2] == (str(tmp_path / "ck" / "last.ckpt"), 3)
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_only_our_partial_files_are_removed(tmp_path):
    ours = [tmp_path / ".last.ckpt.ab12_x9z.partial", tmp_path / ".best-step=20.ckpt.k2j3h4l5.partial"]
    others = [tmp_path / "last.ckpt", tmp_path / "notes.partial", tmp_path / ".last.ckpt.toolong123.partial"]
    for p in ours + others:
        p.write_bytes(b"x")
    assert remove_partial_checkpoints(tmp_path) == sorted(ours)
    assert sorted(tmp_path.iterdir()) == sorted(others)
    assert remove_partial_checkpoints(tmp_path / "missing") == []
