"""Checkpoints written atomically wherever $TMPDIR is: the old file survives any kill.

Lightning's TorchCheckpointIO writes through an fsspec transaction: a temp file in $TMPDIR, then a move onto the
checkpoint. When $TMPDIR is on another filesystem that move is a copy into the existing file, and a kill -9
during the copy leaves `last.ckpt` truncated with the previous good copy gone (measured: 47.7 of 71.8 MB);
on the same filesystem, every kill during a save leaves a checkpoint-sized orphan in /tmp.

`AtomicCheckpointIO` writes the temp file in the checkpoint's own directory (`.<name>.<random>.partial`), fsyncs
it, renames it over the old file (atomic on POSIX) and fsyncs the directory. A kill leaves the old checkpoint
whole and at most one `.partial` file, which `remove_partial_checkpoints` deletes when the next run starts.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# mkstemp's names: our prefix `.<checkpoint name>.`, 8 random characters, our suffix
_PARTIAL = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are temp file in the same directory + fsync + rename.

    `last_saved` is what this process wrote last (path, global step, time): a second SIGTERM/SIGINT, which
    stops at once, reports it (`training/signals.py`)."""

    last_saved: tuple[str, int | None, float] | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):  # a remote store: fsspec's own handling
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options "
                            f"(got {storage_options!r}); use a custom CheckpointIO for them")
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as readable as any new file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself survives a power cut
        AtomicCheckpointIO.last_saved = (str(path), checkpoint.get("global_step"), time.time())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def partial_checkpoints(directory) -> list[Path]:
    """Our temp files in `directory`: what a save killed before its rename left behind."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _PARTIAL.fullmatch(p.name) and p.is_file())


def remove_partial_checkpoints(directory) -> list[Path]:
    """Delete the temp files of saves that were killed (call before training writes into `directory`)."""
    removed = partial_checkpoints(directory)
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        log.info("removed %d partial checkpoint file(s) left by a killed save in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed
