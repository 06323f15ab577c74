"""Encodings, train/val/test paragraph splits, and the token cache (<root>/tokens/<key>/{train,val,test}.bin).

Each split's stream is, book after book, that book's paragraphs of the split (each followed by a blank
line, in book order) and then the <|endoftext|> token. The streams are flat numpy arrays on disk
(uint16 when the vocabulary fits, else uint32) read back as memmaps. The cache key hashes everything
the bytes depend on, so a changed setting builds a new cache and an unchanged one is reused as is.
"""

import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

from gpt_lightning.common.errors import UserError

SPLITS = ("train", "val", "test")


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


def build_tokens(token_dir: Path, enc: tiktoken.Encoding, books: list[dict], labels: dict, inputs: dict) -> dict:
    """Encode every book's paragraphs into the split streams under token_dir; returns the meta dict.

    books: [{"id", "title", "raw_bytes", "clean_chars", "paragraphs"}]; labels: book id -> split of each paragraph.
    Built in a temp dir beside token_dir and renamed into place, so no half cache is ever visible.
    """
    dtype = dtype_for(enc.n_vocab)
    token_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=token_dir.parent, prefix=f".{token_dir.name}."))
    try:
        files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        with files["train"], files["val"], files["test"]:
            per_book = []
            for book in books:
                ids = enc.encode_ordinary_batch([p + "\n\n" for p in book["paragraphs"]])
                counts = dict.fromkeys(SPLITS, 0)
                for s in SPLITS:
                    stream = [t for toks, lab in zip(ids, labels[book["id"]]) if lab == s for t in toks]
                    stream.append(enc.eot_token)
                    np.asarray(stream, dtype=dtype).tofile(files[s])
                    counts[s] = len(stream)
                per_book.append({**{k: book[k] for k in ("id", "title", "raw_bytes", "clean_chars")},
                                 "paragraphs": len(book["paragraphs"]), "tokens": counts})
        meta = {"key": token_dir.name, "encoding": enc.name, "n_vocab": enc.n_vocab, "eot_token": enc.eot_token,
                "dtype": dtype, "tokens": {s: sum(b["tokens"][s] for b in per_book) for s in SPLITS},
                "books": per_book, "inputs": inputs}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        os.rename(tmp, token_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and (token_dir / "meta.json").exists():
            return read_meta(token_dir)  # another process built the same key first
        raise UserError(f"could not write the token cache {token_dir}: {e.strerror or e}; "
                        "free some disk space or choose another data.root") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(token_dir: Path) -> dict:
    return json.loads((token_dir / "meta.json").read_text())
