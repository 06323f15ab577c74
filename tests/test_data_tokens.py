"""Encodings, paragraph splits and the token cache."""

import errno

import numpy as np
import pytest
import tiktoken

from gpt_lightning.data import tokens
from gpt_lightning.data.tokens import build_tokens, check_fractions, dtype_for, get_encoding, split_paragraphs
from gpt_lightning.common.errors import UserError


def test_bytes_encoding_is_built_offline():
    enc = get_encoding("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    ids = enc.encode_ordinary("Capitú, olhos de ressaca")
    assert max(ids) < 256 and enc.decode(ids) == "Capitú, olhos de ressaca"


def test_tiktoken_encodings_load_from_the_cache(require_encoding):
    assert require_encoding("gpt2").n_vocab == 50257


def test_unknown_encoding_is_one_line_listing_valid_names():
    with pytest.raises(UserError) as err:
        get_encoding("gpt5")
    msg = str(err.value)
    assert "\n" not in msg and "'gpt5'" in msg and "bytes" in msg and "o200k_base" in msg


def test_encoding_that_cannot_be_downloaded_mentions_the_cache(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    get_encoding.cache_clear()
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        get_encoding("cl100k_base")
    get_encoding.cache_clear()


def test_token_dtype_fits_the_vocabulary():
    assert dtype_for(257) == dtype_for(50257) == "uint16"
    assert dtype_for(200019) == "uint32"


def test_contiguous_split_puts_val_then_test_at_the_end():
    assert split_paragraphs(10, "contiguous", 0.2, 0.1, 0) == ["train"] * 7 + ["val"] * 2 + ["test"]


def test_random_paragraph_split_is_deterministic_under_the_seed():
    a = split_paragraphs(100, "random_paragraphs", 0.1, 0.1, [42, 55752])
    assert a == split_paragraphs(100, "random_paragraphs", 0.1, 0.1, [42, 55752])
    assert a != split_paragraphs(100, "random_paragraphs", 0.1, 0.1, [43, 55752])
    assert (a.count("train"), a.count("val"), a.count("test")) == (80, 10, 10)
    assert a != sorted(a, key=["train", "val", "test"].index)  # actually shuffled


def test_unknown_split_is_refused():
    with pytest.raises(UserError, match="'blocks'"):
        split_paragraphs(10, "blocks", 0.1, 0.1, 0)


@pytest.mark.parametrize("val, test, bad", [(-0.1, 0.1, "-0.1"), (1.0, 0.0, "val_fraction=1.0"),
                                            (0.5, 0.5, "= 1")])
def test_bad_fractions_are_refused(val, test, bad):
    with pytest.raises(UserError, match=bad):
        check_fractions(val, test)


def test_streams_end_each_book_with_eot(tmp_path):
    enc = get_encoding("bytes")
    books = [{"id": 1, "title": "A", "raw_bytes": 1, "clean_chars": 1, "paragraphs": ["ab", "cd", "ef"]}]
    meta = build_tokens(tmp_path / "k", enc, books, {1: ["train", "train", "val"]}, {})
    train = np.fromfile(tmp_path / "k" / "train.bin", dtype=meta["dtype"])
    assert enc.decode(train.tolist()) == "ab\n\ncd\n\n<|endoftext|>"
    assert meta["tokens"] == {"train": 9, "val": 5, "test": 1}


def test_meta_records_size_dtype_tokens_and_sha256_of_every_file(tmp_path):
    import hashlib

    books = [{"id": 1, "title": "A", "raw_bytes": 1, "clean_chars": 1, "paragraphs": ["ab", "cd", "ef"]}]
    meta = build_tokens(tmp_path / "k", get_encoding("bytes"), books, {1: ["train", "train", "val"]}, {})
    for split, n in meta["tokens"].items():
        data = (tmp_path / "k" / f"{split}.bin").read_bytes()
        assert meta["files"][f"{split}.bin"] == {"bytes": len(data), "dtype": "uint16", "tokens": n,
                                                 "sha256": hashlib.sha256(data).hexdigest()}
    assert tokens.verify_tokens(tmp_path / "k", 257) == meta


def test_a_full_disk_leaves_no_half_cache(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # what fsync reports when the disk fills

    monkeypatch.setattr(tokens.os, "fsync", full)
    books = [{"id": 1, "title": "A", "raw_bytes": 1, "clean_chars": 1, "paragraphs": ["ab"]}]
    with pytest.raises(UserError, match=r"k.*No space left on device"):
        build_tokens(tmp_path / "k", get_encoding("bytes"), books, {1: ["train"]}, {})
    assert list(tmp_path.iterdir()) == []


def test_cache_key_names_the_encoding_and_hashes_every_input():
    key = tokens.cache_key({"encoding": "gpt2", "min_paragraph_chars": 50})
    assert key.startswith("gpt2-")
    assert key != tokens.cache_key({"encoding": "gpt2", "min_paragraph_chars": 51})
