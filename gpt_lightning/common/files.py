"""Atomic file writes: a reader (or a kill) never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temp file in the same folder that, when the block ends normally,
    is fsynced, given the umask's mode and renamed over `path` (atomic on POSIX). If the block raises (a kill, a
    failed check such as a short download), the temp file is removed and `path` keeps its old content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; a shared cache must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, skip_if_same: bool = False) -> None:
    """Atomic UTF-8 write; with `skip_if_same`, an identical existing file is left untouched (mtime kept)."""
    path = Path(path)
    data = text.encode("utf-8")
    if skip_if_same and path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def umask_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file (0o666) or folder (0o777) under the process's umask.

    tempfile.mkstemp/mkdtemp create 0600/0700 whatever the umask; chmod their results to this before the
    rename that publishes them, or a cache shared between users is unreadable to all but its writer.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    # Linux reports it without changing it; os.umask(0) would, for an instant, for every thread.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
