"""Download Gutenberg books into <root>/raw/<ID>.txt, exactly as served, once.

A book already cached is never fetched again; with every book cached no HTTP session is even made.
Files appear atomically (common.files.atomic_file: temp file in the same dir, fsync, rename), so an interrupted or short download
never leaves a file behind. One missing book does not stop the others: all the rest are fetched,
then one UserError lists every missing book. A server that cannot be reached at all (connection refused,
connect timeout, unknown host) stops the whole fetch at the first book: every other URL is on the same host.
"""

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import NewConnectionError
from urllib3.util.retry import Retry

from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import atomic_file

log = logging.getLogger(__name__)
USER_AGENT = "gpt_lightning/0.1 (+corpus fetcher)"


def check_base_url(base_url: str) -> str:
    """Refuse anything but http(s)://host before any work; returns the URL without a trailing /."""
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"data.base_url={base_url!r} is not an http(s) URL; "
                        "use https://www.gutenberg.org or a mirror laid out like it")
    return base_url.rstrip("/")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_http(timeout, retries, backoff_factor, pause):
    """Refuse bad HTTP settings before any network, one line each; returns timeout as requests takes it."""
    if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        raise UserError(f"data.retries={retries!r} must be a whole number >= 0 (0: try each URL once)")
    pair = isinstance(timeout, Sequence) and not isinstance(timeout, (str, bytes))  # list, tuple, ListConfig
    values = list(timeout) if pair else [timeout]
    if (pair and len(values) != 2) or not all(_number(t) and t > 0 for t in values):
        raise UserError(f"data.timeout={timeout!r} must be a number of seconds > 0 or a pair [connect, read] "
                        "of them, e.g. [10, 60]")
    for name, value in (("backoff_factor", backoff_factor), ("pause", pause)):
        if not (_number(value) and value >= 0):
            raise UserError(f"data.{name}={value!r} must be a number of seconds >= 0")
    return tuple(float(t) for t in values) if pair else float(timeout)


def connect_timeout(timeout) -> float:
    return timeout[0] if isinstance(timeout, tuple) else timeout


def book_urls(base_url: str, book_id) -> list[str]:
    """Where Gutenberg keeps a book's plain text, in the order tried."""
    return [f"{base_url}/cache/epub/{book_id}/pg{book_id}.txt", f"{base_url}/files/{book_id}/{book_id}-0.txt"]


def make_session(retries: int, backoff_factor: float, backoff_max: float = 120.0) -> requests.Session:
    """A session that retries connection errors and 5xx with exponential backoff (urllib3 Retry).

    backoff_max caps each sleep; fetch_books passes the connect timeout, so a closed port gives up within
    retries x connect timeout (urllib3's own cap is 120 s: about a minute per URL with the defaults).
    """
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff_factor,
                  backoff_max=backoff_max, status_forcelist=(500, 502, 503, 504), allowed_methods=("GET",),
                  raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    # identity: the bytes on disk are the bytes served, and Content-Length counts them
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    return session


class _ShortBody(Exception):
    pass


class Unreachable(Exception):
    """No connection could be made to the server (after urllib3's retries): trying more URLs there is futile."""


def _cannot_connect(e: requests.RequestException) -> bool:
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(e, requests.ConnectTimeout) or isinstance(reason, NewConnectionError)


def _reason(e: Exception) -> str:
    """One line for a requests/urllib3 error (their default str is a nested repr)."""
    inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
    inner = getattr(inner, "reason", inner)
    return f"{type(e).__name__}: {inner}".replace("\n", " ")


def download(session, url: str, dest: Path, timeout, retries: int, backoff_factor: float) -> str | None:
    """GET url into dest atomically. Returns None on success, else the last status/error as text.

    Connection errors and 5xx are retried inside urllib3; a body cut short (urllib3 raises while
    streaming, or fewer bytes than Content-Length) is retried here with the same backoff.
    Raises Unreachable when no connection could be made at all.
    """
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_factor * 2 ** (attempt - 1))
        try:
            r = session.get(url, stream=True, timeout=timeout)
        except requests.RequestException as e:
            if _cannot_connect(e):
                raise Unreachable(_reason(e)) from e
            return _reason(e)  # urllib3 already retried it
        try:
            with r:
                if r.status_code != 200:
                    return f"HTTP {r.status_code}"
                size = int(r.headers.get("Content-Length", 0)) or None
                written = 0
                with atomic_file(dest, suffix=".part") as f, tqdm(total=size, unit="B", unit_scale=True,
                                                                   desc=dest.stem, leave=False, disable=None) as bar:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                    if size is not None and written != size:  # raised inside: the partial file is removed
                        raise _ShortBody(f"body of {written} bytes, Content-Length {size}")
            return None
        except (_ShortBody, requests.exceptions.ChunkedEncodingError, requests.ConnectionError) as e:
            last = f"short body ({e})" if isinstance(e, _ShortBody) else _reason(e)
            log.warning("%s: %s (attempt %d of %d)", url, last, attempt + 1, retries + 1)
        except requests.RequestException as e:
            return _reason(e)
        except OSError as e:  # our side: disk full, permissions
            raise UserError(f"could not write {dest}: {e.strerror or e}; free some disk space "
                            "or choose another data.root") from e
    return last


def fetch_books(book_ids, raw_dir: Path, base_url: str, timeout=(10, 60), retries: int = 5,
                backoff_factor: float = 1.0, pause: float = 1.0) -> None:
    """Make sure <raw_dir>/<ID>.txt exists for every book; UserError listing every book that could not be had."""
    base_url = check_base_url(base_url)
    timeout = check_http(timeout, retries, backoff_factor, pause)  # (connect, read) or one number for both
    todo = [b for b in book_ids if not (raw_dir / f"{b}.txt").exists()]
    if not todo:
        return  # everything cached: no session, no network
    raw_dir.mkdir(parents=True, exist_ok=True)
    cached = lambda: sum((raw_dir / f"{b}.txt").exists() for b in book_ids)  # noqa: E731
    missing = []
    with make_session(retries, backoff_factor, backoff_max=connect_timeout(timeout)) as session:
        for i, book in enumerate(todo):
            if i and pause:
                time.sleep(pause)  # be polite between downloads (Gutenberg's robot policy)
            tried = []
            for url in book_urls(base_url, book):
                log.info("downloading book %s from %s", book, url)
                try:
                    error = download(session, url, raw_dir / f"{book}.txt", timeout, retries, backoff_factor)
                except Unreachable as e:
                    left = [b for b in book_ids if not (raw_dir / f"{b}.txt").exists()]
                    raise UserError(f"cannot connect to {base_url}: {url} ({e}) after {retries} retries; "
                                    f"{cached()} of {len(book_ids)} books are cached in {raw_dir} (missing: "
                                    f"{', '.join(map(str, left))}); check data.base_url and the network, or put "
                                    f"the books at {raw_dir}/<ID>.txt") from None
                if error is None:
                    break
                tried.append(f"{url} ({error})")
            else:
                missing.append(f"  book {book}: tried " + ", ".join(tried))
    if missing:
        raise UserError(f"could not download {len(missing)} of {len(book_ids)} books ({cached()} of "
                        f"{len(book_ids)} are cached in {raw_dir}); check data.books and data.base_url:\n"
                        + "\n".join(missing))
