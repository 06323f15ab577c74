"""Fetching: real HTTP against a loopback server laid out as Gutenberg's URLs."""

import os
import socket
import time

import pytest
import requests

from gpt_lightning.data.fetch import fetch_books
from gpt_lightning.common.errors import UserError

FAST = dict(retries=3, backoff_factor=0.001, pause=0, timeout=(5, 10))


def fetch(server, ids, raw_dir, **kw):
    fetch_books(ids, raw_dir, server.base_url, **{**FAST, **kw})


def test_downloads_each_book_exactly_as_served(gutenberg_server, make_gutenberg_text, tmp_path):
    raw = make_gutenberg_text("Helena", ["Uma frase qualquer."])
    gutenberg_server.add_book(1, raw)
    fetch(gutenberg_server, [1], tmp_path)
    assert (tmp_path / "1.txt").read_bytes() == raw
    assert gutenberg_server.request_headers[0]["User-Agent"].startswith("gpt_lightning/")


def test_second_run_sends_no_request_and_makes_no_session(gutenberg_server, make_gutenberg_text, tmp_path,
                                                          monkeypatch):
    gutenberg_server.add_book(1, make_gutenberg_text("Helena", ["Uma frase."]))
    fetch(gutenberg_server, [1], tmp_path)
    assert gutenberg_server.requests == ["/cache/epub/1/pg1.txt"]
    monkeypatch.setattr(requests, "Session", lambda: pytest.fail("a session was made with every book cached"))
    fetch(gutenberg_server, [1], tmp_path)
    assert len(gutenberg_server.requests) == 1


def test_503_twice_then_200_is_retried(gutenberg_server, make_gutenberg_text, tmp_path):
    path = gutenberg_server.add_book(1, make_gutenberg_text("Helena", ["Uma frase."]))
    gutenberg_server.fail(path, [503, 503])
    fetch(gutenberg_server, [1], tmp_path)
    assert gutenberg_server.requests_for(path) == 3
    assert (tmp_path / "1.txt").exists()


def test_truncated_body_is_retried(gutenberg_server, make_gutenberg_text, tmp_path):
    raw = make_gutenberg_text("Helena", ["Uma frase."] * 50)
    path = gutenberg_server.add_book(1, raw)
    gutenberg_server.truncate(path, times=1)
    fetch(gutenberg_server, [1], tmp_path)
    assert gutenberg_server.requests_for(path) == 2
    assert (tmp_path / "1.txt").read_bytes() == raw


def test_truncated_body_never_leaves_a_file(gutenberg_server, make_gutenberg_text, tmp_path):
    path = gutenberg_server.add_book(1, make_gutenberg_text("Helena", ["Uma frase."] * 50))
    gutenberg_server.truncate(path, times=100)
    with pytest.raises(UserError, match="book 1"):
        fetch(gutenberg_server, [1], tmp_path)
    assert gutenberg_server.requests_for(path) == FAST["retries"] + 1
    assert list(tmp_path.iterdir()) == []  # neither 1.txt nor a .part file


def test_404_at_first_url_falls_back_to_second(gutenberg_server, make_gutenberg_text, tmp_path):
    raw = make_gutenberg_text("Helena", ["Uma frase."])
    gutenberg_server.add_book(7, raw, layout="files")
    fetch(gutenberg_server, [7], tmp_path)
    assert gutenberg_server.requests == ["/cache/epub/7/pg7.txt", "/files/7/7-0.txt"]
    assert (tmp_path / "7.txt").read_bytes() == raw


def test_missing_book_is_named_with_urls_and_status_and_the_others_are_kept(gutenberg_server, make_gutenberg_text,
                                                                          tmp_path):
    gutenberg_server.add_book(1, make_gutenberg_text("Um", ["Uma frase."]))
    gutenberg_server.add_book(3, make_gutenberg_text("Tres", ["Outra frase."]))
    with pytest.raises(UserError) as err:
        fetch(gutenberg_server, [1, 2, 3], tmp_path)
    lines = [l for l in str(err.value).splitlines() if "book 2" in l]
    base = gutenberg_server.base_url
    assert len(lines) == 1
    assert f"{base}/cache/epub/2/pg2.txt (HTTP 404)" in lines[0] and f"{base}/files/2/2-0.txt (HTTP 404)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.txt", "3.txt"]


def test_downloaded_files_follow_the_umask(gutenberg_server, make_gutenberg_text, tmp_path):
    gutenberg_server.add_book(1, make_gutenberg_text("Helena", ["Uma frase."]))
    old = os.umask(0o022)
    try:
        fetch(gutenberg_server, [1], tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "1.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600


def closed_port() -> str:
    """http://127.0.0.1:<a port nothing listens on> (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_connection_refused_names_the_url_and_the_cause(tmp_path):
    with pytest.raises(UserError, match=r"cannot connect to http://127\.0\.0\.1:9: "
                                        r"http://127\.0\.0\.1:9/cache/epub/5/pg5\.txt \(.*refused"):
        fetch_books([5], tmp_path, "http://127.0.0.1:9", retries=0, backoff_factor=0, pause=0, timeout=(2, 2))


def test_closed_port_fails_within_connect_timeout_times_retries(tmp_path):
    # Before: each of the 2 URLs of each book slept through urllib3's backoff (0 + 2 + 4 s here, 30 s with
    # the defaults), so these 3 books took 36 s. Now each sleep is capped at the connect timeout and the
    # first unreachable URL ends the fetch.
    start = time.monotonic()
    with pytest.raises(UserError):
        fetch_books([1, 2, 3], tmp_path, closed_port(), retries=3, backoff_factor=1.0, pause=0, timeout=(0.2, 5))
    assert time.monotonic() - start < 3 * 0.2 + 0.5


def test_closed_port_says_how_many_books_are_cached(tmp_path):
    (tmp_path / "2.txt").write_bytes(b"cached")
    with pytest.raises(UserError) as err:
        fetch_books([1, 2, 3], tmp_path, closed_port(), retries=0, backoff_factor=0, pause=0, timeout=(1, 1))
    msg = str(err.value)
    assert "\n" not in msg and "others are cached" not in msg
    assert f"1 of 3 books are cached in {tmp_path} (missing: 1, 3)" in msg
    with pytest.raises(UserError, match="0 of 1 books are cached"):
        fetch_books([7], tmp_path / "empty", closed_port(), retries=0, backoff_factor=0, pause=0, timeout=(1, 1))


@pytest.mark.parametrize("setting, value, says", [
    ("retries", -1, "data.retries=-1 must be a whole number >= 0"),
    ("retries", 1.5, "data.retries=1.5"),
    ("retries", "abc", "data.retries='abc'"),
    ("timeout", "abc", "data.timeout='abc' must be a number of seconds > 0 or a pair"),
    ("timeout", [0, 0], r"data.timeout=\[0, 0\]"),
    ("timeout", [5], r"data.timeout=\[5\]"),
    ("timeout", [5, 10, 15], r"data.timeout=\[5, 10, 15\]"),
    ("timeout", -1, "data.timeout=-1"),
    ("timeout", float("nan"), "data.timeout=nan"),
    ("backoff_factor", -1, "data.backoff_factor=-1 must be a number of seconds >= 0"),
    ("backoff_factor", "x", "data.backoff_factor='x'"),
    ("pause", -0.5, "data.pause=-0.5 must be a number of seconds >= 0"),
])
def test_bad_http_settings_are_one_line_before_any_request(gutenberg_server, tmp_path, setting, value, says):
    with pytest.raises(UserError, match=says) as err:
        fetch(gutenberg_server, [1], tmp_path / "raw", **{setting: value})
    assert "\n" not in str(err.value)
    assert gutenberg_server.requests == [] and not (tmp_path / "raw").exists()


def test_a_missing_book_counts_the_cached_ones(gutenberg_server, make_gutenberg_text, tmp_path):
    gutenberg_server.add_book(1, make_gutenberg_text("Um", ["Uma frase."]))
    with pytest.raises(UserError, match=rf"could not download 2 of 3 books \(1 of 3 are cached in {tmp_path}\)"):
        fetch(gutenberg_server, [1, 2, 3], tmp_path)


@pytest.mark.parametrize("base_url", ["ftp://www.gutenberg.org", "file:///tmp", "www.gutenberg.org"])
def test_non_http_base_url_is_refused_before_anything(base_url, tmp_path):
    with pytest.raises(UserError, match="base_url"):
        fetch_books([1], tmp_path / "raw", base_url)
    assert not (tmp_path / "raw").exists()


def test_a_full_disk_is_a_clear_error_and_leaves_no_file(gutenberg_server, make_gutenberg_text, tmp_path, monkeypatch):
    import errno
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    gutenberg_server.add_book(1, make_gutenberg_text("Helena", ["Uma frase."]))
    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(UserError, match=r"1\.txt: No space left on device"):
        fetch(gutenberg_server, [1], tmp_path)
    assert list(tmp_path.iterdir()) == []
