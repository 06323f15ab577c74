"""Encodings, train/val/test paragraph splits, and the token cache (<root>/tokens/<key>/{train,val,test}.bin).

Each split's stream is, book after book, that book's paragraphs of the split (each followed by a blank
line, in book order) and then the <|endoftext|> token. The streams are flat numpy arrays on disk
(uint16 when the vocabulary fits, else uint32) read back as memmaps. The cache key hashes everything
the bytes depend on, so a changed setting builds a new cache and an unchanged one is reused as is.

The cache is verified before use: meta.json records, per file, its byte size, dtype, token count and a
sha256 computed while writing; `verify_tokens` checks every file against it (and that no token id is
beyond the vocabulary) and raises DamagedCache naming the first file that does not match.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import umask_mode

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
_CHUNK = 1 << 24  # bytes read at a time when verifying (a multiple of every dtype's size)


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding by name, or "bytes": 256 byte symbols + <|endoftext|> (257), built here, offline."""
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]{1,256}",  # any chunking works: no merges
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    valid = tiktoken.list_encoding_names()
    if name not in valid:
        raise UserError(f"unknown data.encoding={name!r}; valid: {', '.join(valid + ['bytes'])}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads its files on first use
        raise UserError(f"could not load tiktoken encoding {name!r} ({type(e).__name__}); offline? point "
                        "TIKTOKEN_CACHE_DIR at a cache that holds it (e.g. ../shared/tiktoken_cache), "
                        "or use data.encoding=bytes") from e


@functools.lru_cache(maxsize=None)
def token_byte_lengths(name: str) -> np.ndarray:
    """UTF-8 bytes each token id of encoding `name` decodes to, computed once: the denominator of bits per byte.

    Special tokens (<|endoftext|>) and ids the encoding leaves unused count 0 bytes: they are no text.
    """
    enc = get_encoding(name)
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i in special:
            continue
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # a gap in the vocabulary (o200k_base has some)
            pass
    return lengths


def encode_prompt(tokenizer: tiktoken.Encoding, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt starts from <|endoftext|>, as a new document would."""
    return tokenizer.encode_ordinary(prompt) or [tokenizer.eot_token]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise UserError(f"data.{name}={f} must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} "
                        "must be < 1 to leave text for training")


def split_paragraphs(n: int, split: str, val_fraction: float, test_fraction: float, seed) -> list[str]:
    """The split ("train"/"val"/"test") of each of a book's n paragraphs.

    contiguous: the last test_fraction of the paragraphs is test, the val_fraction before it val, so
    no val/test window holds train text. random_paragraphs: the same counts drawn at random (seeded).
    """
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    labels = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    if split == "contiguous":
        return labels
    if split == "random_paragraphs":
        order = np.random.default_rng(seed).permutation(n)
        out = [""] * n
        for label, i in zip(labels, order):
            out[i] = label
        return out
    raise UserError(f"unknown data.split={split!r}; valid: contiguous, random_paragraphs")


def cache_key(inputs: dict) -> str:
    """A readable, content-addressed directory name: <encoding>-<hash of every input>."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    return f"{inputs['encoding']}-{digest}"


def dtype_for(n_vocab: int) -> str:
    return "uint16" if n_vocab <= 1 << 16 else "uint32"


class DamagedCache(Exception):
    """A token cache that does not match its meta.json; the message names the file and what is wrong."""


class _Stream:
    """One split's .bin being written: token count and sha256 kept as the bytes go out."""

    def __init__(self, path: Path, dtype: str):
        self.file, self.dtype, self.sha, self.tokens = open(path, "wb"), dtype, hashlib.sha256(), 0

    def write(self, ids: list[int]) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.tokens += len(ids)

    def record(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"bytes": self.tokens * np.dtype(self.dtype).itemsize, "dtype": self.dtype, "tokens": self.tokens,
                "sha256": self.sha.hexdigest()}


def _write_cache(tmp: Path, key: str, enc: tiktoken.Encoding, books: list[dict], labels: dict, inputs: dict) -> dict:
    dtype = dtype_for(enc.n_vocab)
    streams = {s: _Stream(tmp / f"{s}.bin", dtype) for s in SPLITS}
    try:
        per_book = []
        for book in books:
            ids = enc.encode_ordinary_batch([p + "\n\n" for p in book["paragraphs"]])
            counts = dict.fromkeys(SPLITS, 0)
            for s in SPLITS:
                stream = [t for toks, lab in zip(ids, labels[book["id"]]) if lab == s for t in toks]
                stream.append(enc.eot_token)
                streams[s].write(stream)
                counts[s] = len(stream)
            per_book.append({**{k: book[k] for k in ("id", "title", "raw_bytes", "clean_chars")},
                             "paragraphs": len(book["paragraphs"]), "tokens": counts})
        files = {f"{s}.bin": streams[s].record() for s in SPLITS}
    finally:
        for stream in streams.values():
            stream.file.close()
    meta = {"key": key, "encoding": enc.name, "n_vocab": enc.n_vocab, "eot_token": enc.eot_token,
            "dtype": dtype, "tokens": {s: sum(b["tokens"][s] for b in per_book) for s in SPLITS},
            "files": files, "books": per_book, "inputs": inputs}
    with open(tmp / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False))
        f.flush()
        os.fsync(f.fileno())
    return meta


@contextlib.contextmanager
def _build_lock(parent: Path):
    """An exclusive flock on tokens/ itself (no lock file to leave behind) while one process builds.

    Two runs sharing data.root that find the same cache missing or damaged then build it once: the second
    waits, re-verifies and uses the first one's cache. Yields False where the filesystem has no locks.
    """
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False  # e.g. some network filesystems: build unlocked, as before
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _replace_dir(tmp: Path, token_dir: Path) -> None:
    """Publish the finished tmp as token_dir. A damaged token_dir is renamed aside first, then deleted:
    a directory cannot be renamed over a non-empty one. At every instant token_dir is the old cache, the
    complete new one, or absent (rebuilt next time); never a mix."""
    if os.path.lexists(token_dir):
        aside = token_dir.with_name(f".{token_dir.name}.damaged-{os.getpid()}")
        os.rename(token_dir, aside)
        os.rename(tmp, token_dir)
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)  # what stays is removed by the next build of this key
        else:
            aside.unlink()
    else:
        os.rename(tmp, token_dir)


def build_tokens(token_dir: Path, enc: tiktoken.Encoding, books: list[dict], labels: dict, inputs: dict) -> dict:
    """Encode every book's paragraphs into the split streams under token_dir; returns the meta dict.

    books: [{"id", "title", "raw_bytes", "clean_chars", "paragraphs"}]; labels: book id -> split of each paragraph.
    Built in a temp dir beside token_dir and renamed into place (replacing a damaged token_dir), so no half
    cache is ever visible. Leftover temp dirs of killed builds of this key are removed first.
    """
    tmp = None
    try:
        token_dir.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(token_dir.parent) as locked:
            with contextlib.suppress(DamagedCache):
                return verify_tokens(token_dir, enc.n_vocab)  # built by another process while we waited
            if locked:  # no other builder of this key is alive: what matches .<key>.* is left over
                for stale in token_dir.parent.glob(f".{token_dir.name}.*"):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=token_dir.parent, prefix=f".{token_dir.name}."))
            meta = _write_cache(tmp, token_dir.name, enc, books, labels, inputs)
            os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes 0700: a shared cache must be readable
            _replace_dir(tmp, token_dir)
            return meta
    except OSError as e:
        raise UserError(f"could not write the token cache {token_dir}: {e.strerror or e}; "
                        "free some disk space or choose another data.root") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(token_dir: Path) -> dict:
    return json.loads((token_dir / "meta.json").read_text())


def _check_file(path: Path, record: dict, n_vocab: int) -> None:
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DamagedCache(f"{path} is {size:,} bytes, meta.json records {record['bytes']:,} "
                           f"({record['tokens']:,} {record['dtype']} tokens)")
    sha, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            top = max(top, int(np.frombuffer(chunk, dtype=record["dtype"]).max()))
    if top >= n_vocab:
        raise DamagedCache(f"{path} holds token id {top}, beyond the vocabulary of {n_vocab}")
    if sha.hexdigest() != record["sha256"]:
        raise DamagedCache(f"{path} does not match the sha256 in meta.json (its bytes changed)")


def verify_tokens(token_dir: Path, n_vocab: int) -> dict:
    """meta.json of token_dir when every split file matches it; DamagedCache naming the first file that does not.

    Reads every byte (sha256 at ~1 GB/s: milliseconds for the 12 books), so a truncated, extended or edited
    file, a missing one, or an unreadable meta.json is found before any training step reads it.
    """
    meta_path = token_dir / "meta.json"
    if not token_dir.is_dir():
        raise DamagedCache(f"{token_dir} is {'not a folder' if os.path.lexists(token_dir) else 'missing'}")
    try:
        meta = read_meta(token_dir)
        files = meta["files"]
        records = [(token_dir / f"{s}.bin", files[f"{s}.bin"]) for s in SPLITS]
        for _, r in records:
            if not (r["dtype"] == dtype_for(n_vocab) and isinstance(r["bytes"], int)
                    and isinstance(r["sha256"], str) and r["bytes"] == r["tokens"] * np.dtype(r["dtype"]).itemsize):
                raise ValueError("inconsistent file record")
    except FileNotFoundError:
        raise DamagedCache(f"{meta_path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCache(f"{meta_path} is unreadable or incomplete ({type(e).__name__}: {e})") from None
    if meta.get("key") != token_dir.name or meta.get("n_vocab") != n_vocab:
        raise DamagedCache(f"{meta_path} describes cache {meta.get('key')!r} with n_vocab {meta.get('n_vocab')}, "
                           f"not {token_dir.name!r} with {n_vocab}")
    for path, record in records:
        try:
            _check_file(path, record, n_vocab)
        except FileNotFoundError:
            raise DamagedCache(f"{path} is missing") from None
        except OSError as e:
            raise DamagedCache(f"{path} cannot be read ({e.strerror or e})") from None
    return meta
