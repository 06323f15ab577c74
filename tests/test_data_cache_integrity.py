"""The token cache is verified before use: damage is rebuilt by prepare_data (one warning naming the file) and
refused by setup; a complete cache works read-only; everything is created with the process's umask."""

import builtins
import errno
import io
import logging
import os
import re
import stat

import numpy as np
import pytest

from gpt_lightning.common.errors import UserError
from gpt_lightning.data import tokens


def files_of(token_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(token_dir.iterdir())}


@pytest.fixture
def built(fixture_dm):
    """A prepared cache: (make, its token_dir, its files' bytes)."""
    dm = fixture_dm()
    dm.prepare_data()
    dm.setup("fit")
    return fixture_dm, dm.token_dir, files_of(dm.token_dir)


def set_token(path, index, value):
    data = np.fromfile(path, dtype="uint16")
    data[index] = value
    data.tofile(path)


DAMAGE = {  # what is done to a good cache -> what the one warning / error line must say
    "train.bin truncated to 1,000 bytes": (lambda d: os.truncate(d / "train.bin", 1000), r"train\.bin is 1,000 bytes"),
    "train.bin cut to half": (lambda d: os.truncate(d / "train.bin", (d / "train.bin").stat().st_size // 2),
                              r"train\.bin is [\d,]+ bytes, meta\.json records"),
    "an odd byte count": (lambda d: open(d / "test.bin", "ab").write(b"\0"), r"test\.bin is [\d,]*[13579] bytes"),
    "a token id beyond the vocabulary": (lambda d: set_token(d / "train.bin", 10, 60000),
                                         r"train\.bin holds token id 60000, beyond the vocabulary of 257"),
    "a changed token": (lambda d: set_token(d / "val.bin", 3, 65), r"val\.bin does not match the sha256"),
    "val.bin deleted": (lambda d: (d / "val.bin").unlink(), r"val\.bin is missing"),
    "meta.json corrupt": (lambda d: (d / "meta.json").write_text("{not json"), r"meta\.json is unreadable"),
    "meta.json a list": (lambda d: (d / "meta.json").write_text("[]"), r"meta\.json is unreadable"),
    "meta.json deleted": (lambda d: (d / "meta.json").unlink(), r"meta\.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_prepare_rebuilds_a_damaged_cache_with_one_warning(built, damage, caplog):
    make, token_dir, good = built
    do, says = DAMAGE[damage]
    do(token_dir)
    dm = make()
    with caplog.at_level(logging.WARNING):
        meta = dm.prepare_data()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(token_dir) in warnings[0] and re.search(says, warnings[0]), warnings[0]
    assert files_of(token_dir) == good and meta == tokens.read_meta(token_dir)
    dm.setup("fit")  # and it trains on the rebuilt, complete streams
    assert dm.datasets["train"].n_tokens == meta["tokens"]["train"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_setup_refuses_a_damaged_cache_and_says_to_prepare(built, damage):
    make, token_dir, _ = built
    do, says = DAMAGE[damage]
    do(token_dir)
    before = files_of(token_dir)
    with pytest.raises(UserError, match=rf"damaged token cache: .*{says}.*gpt_lightning\.prepare") as err:
        make().setup("fit")
    assert "\n" not in str(err.value)
    assert files_of(token_dir) == before  # setup only reads: no rank but prepare's ever writes


def test_leftovers_of_a_killed_build_are_removed_on_rebuild(built):
    make, token_dir, good = built
    leftover = token_dir.parent / f".{token_dir.name}.x1y2z3"  # a kill -9 during build leaves its temp dir
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\0" * 10)
    (token_dir / "meta.json").unlink()
    make().prepare_data()
    assert files_of(token_dir) == good
    assert sorted(p.name for p in token_dir.parent.iterdir()) == [token_dir.name]


def test_a_build_that_finds_the_cache_complete_uses_it(built, monkeypatch):
    """What a process waiting on another's build sees once the lock is free: the finished cache, not a rebuild."""
    _, token_dir, good = built
    mtime = (token_dir / "train.bin").stat().st_mtime_ns
    monkeypatch.setattr(tokens, "_write_cache", lambda *a: pytest.fail("re-encoded a complete cache"))
    meta = tokens.build_tokens(token_dir, tokens.get_encoding("bytes"), [], {}, {})
    assert meta == tokens.read_meta(token_dir) and (token_dir / "train.bin").stat().st_mtime_ns == mtime


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): chmod -R a-w, and (because chmod does not bind root, who runs CI containers) make
    every write under `folder` fail with EACCES as the kernel would for anyone else."""
    monkeypatch = pytest.MonkeyPatch()

    def apply(folder):
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        inside = lambda p: str(os.path.abspath(os.fsdecode(p))).startswith(str(folder))  # noqa: E731

        def deny(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))

        def guard(real, writes=lambda *a, **k: True):
            def wrapped(p, *args, **kwargs):
                if not isinstance(p, int) and inside(p) and writes(*args, **kwargs):
                    deny(p)
                return real(p, *args, **kwargs)
            return wrapped

        writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: flags & writing_flags))
        writing_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
        monkeypatch.setattr(builtins, "open", guard(builtins.open, writing_mode))
        monkeypatch.setattr(io, "open", guard(io.open, writing_mode))
        for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "chmod"):
            monkeypatch.setattr(os, name, guard(getattr(os, name)))
        return folder

    yield apply
    monkeypatch.undo()
    for path in [tmp_path, *tmp_path.rglob("*")]:  # writable again, so pytest can clean up as any user
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_complete_read_only_cache_is_used_as_it_is(built, read_only, tmp_path):
    make, token_dir, good = built
    read_only(tmp_path / "data")
    dm = make()
    meta = dm.prepare_data()
    dm.setup("fit")
    assert meta["key"] == token_dir.name and len(dm.datasets["train"]) > 0


def test_a_read_only_root_that_must_be_written_names_the_folder(built, read_only, tmp_path,
                                                               gutenberg_server):
    make, token_dir, _ = built
    asked = len(gutenberg_server.requests)
    read_only(tmp_path / "data")
    with pytest.raises(UserError, match=rf"is not writable \(Permission denied\): {tmp_path / 'data' / 'tokens'} "
                                        "must be written"):
        make(min_paragraph_chars=60).prepare_data()  # another configuration: a new tokens/<key> is needed
    with pytest.raises(UserError, match=rf"{tmp_path / 'data' / 'raw'} must be written"):
        make(books=[90001, 90004]).prepare_data()  # a book not downloaded yet: refused before any request
    assert len(gutenberg_server.requests) == asked


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_everything_is_created_with_the_umask(fixture_dm, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        dm = fixture_dm()
        dm.prepare_data()
    finally:
        os.umask(old)
    root = tmp_path / "data"
    modes = {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}
    wrong = {p: oct(m) for p, m in modes.items() if m != (dir_mode if (root / p).is_dir() else file_mode)}
    assert not wrong and len(modes) == 1 + 3 + 3 + 3 + 1 + 4  # root, 3 folders, 3 raw, 3 clean, tokens/<key>, 4 files
