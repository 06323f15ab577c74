"""MachadoDataModule end to end on generated books (bytes encoding) and on the 12 real books (gpt2)."""

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_lightning.data import MachadoDataModule, tokens
from gpt_lightning.common.errors import UserError


def prepared(make, stage=None, **overrides) -> MachadoDataModule:
    dm = make(**overrides)
    dm.prepare_data()
    dm.setup(stage)
    return dm


def split_paragraphs_of(dm, split: str) -> list[str]:
    """The paragraphs of a split, decoded back from its token stream."""
    ids = np.fromfile(dm.token_dir / f"{split}.bin", dtype=dm.meta["dtype"]).tolist()
    text = dm.tokenizer.decode(ids).replace("<|endoftext|>", "")
    return [p for p in text.split("\n\n") if p]


def test_config_keys_are_the_constructor_arguments(fixture_corpus, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    base_url, ids = fixture_corpus
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"data.base_url={base_url}", f"data.root={tmp_path}/data",
                                           f"data.books=[{ids[0]}]", "data.encoding=bytes", "data.pause=0"])
    assert set(cfg.data) - {"_target_"} == set(inspect.signature(MachadoDataModule).parameters)
    dm = instantiate(cfg.data)
    assert dm.hparams.block_size == cfg.model.block_size
    assert dm.prepare_data()["books"][0]["title"] == "Livro 1"


def test_tokenizer_is_ready_before_prepare(fixture_dm):
    dm = fixture_dm()
    assert (dm.vocab_size, dm.eot_token) == (257, 256)
    assert dm.tokenizer.decode(dm.tokenizer.encode_ordinary("Capitú")) == "Capitú"


def test_prepare_data_sets_no_state(fixture_dm):
    dm = fixture_dm()
    before = dict(vars(dm))
    meta = dm.prepare_data()
    assert vars(dm) == before and dm.meta is None
    assert [b["id"] for b in meta["books"]] == dm.books


def test_prepare_writes_raw_clean_and_tokens(fixture_dm, tmp_path):
    dm = prepared(fixture_dm)
    root = tmp_path / "data"
    assert sorted(p.name for p in (root / "raw").iterdir()) == ["90001.txt", "90002.txt", "90003.txt"]
    clean = (root / "clean" / "90001.txt").read_text()
    assert clean.startswith("—Capitulo 90001.0:") and clean.endswith("\n\n<|endoftext|>\n")
    assert dm.token_dir.parent == root / "tokens" and dm.meta["encoding"] == "bytes"
    assert [b["title"] for b in dm.meta["books"]] == ["Livro 1", "Livro 2", "Livro 3"]


def test_y_is_x_shifted_by_one(fixture_dm):
    dm = prepared(fixture_dm)
    stream = np.fromfile(dm.token_dir / "train.bin", dtype=dm.meta["dtype"]).astype(np.int64)
    ds = dm.datasets["train"]
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (32,)
        assert torch.equal(x, torch.from_numpy(stream[i * 32:i * 32 + 32]))
        assert torch.equal(y, torch.from_numpy(stream[i * 32 + 1:i * 32 + 33]))


def test_no_val_or_test_text_overlaps_train(fixture_dm, tmp_path):
    dm = prepared(fixture_dm)
    train, val, test = (set(split_paragraphs_of(dm, s)) for s in ("train", "val", "test"))
    assert val and test and not (train & val) and not (train & test) and not (val & test)
    clean = (tmp_path / "data" / "clean" / "90001.txt").read_text().split("\n\n")[:-1]
    assert clean[-9:] == [p for p in split_paragraphs_of(dm, "test") if p.startswith("—Capitulo 90001.")]


def test_eval_windows_do_not_overlap_and_train_stride_is_configurable(fixture_dm):
    dm = prepared(fixture_dm, train_stride=16)
    val = dm.datasets["val"]
    assert val.stride == 32 and len(val) == (val.n_tokens - 33) // 32 + 1
    train = dm.datasets["train"]
    assert len(train) == (train.n_tokens - 33) // 16 + 1
    assert torch.equal(train[1][0][:16], train[0][0][16:])


def test_train_loader_is_shuffled_by_the_seed_and_drops_the_last_batch(fixture_dm):
    first = next(iter(prepared(fixture_dm).train_dataloader()))[0]
    assert torch.equal(first, next(iter(prepared(fixture_dm).train_dataloader()))[0])
    assert not torch.equal(first, next(iter(prepared(fixture_dm, seed=7).train_dataloader()))[0])
    dm = prepared(fixture_dm)
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == len(dm.datasets["train"]) // 4
    assert not dm.val_dataloader().drop_last


def test_windows_pickle_into_worker_processes(fixture_dm):
    dm = prepared(fixture_dm, num_workers=1)
    ds = dm.datasets["val"]
    ds[0]  # opens the memmap
    assert pickle.loads(pickle.dumps(ds))._data is None
    loader = dm.val_dataloader()
    assert loader.persistent_workers
    x, y = next(iter(loader))
    assert x.shape == (4, 32) and torch.equal(x[0], ds[0][0])


def test_second_prepare_makes_no_request(fixture_dm, gutenberg_server):
    fixture_dm().prepare_data()
    assert len(gutenberg_server.requests) == 4  # 3 books, one of them only at the second URL
    fixture_dm().prepare_data()
    assert len(gutenberg_server.requests) == 4


def test_unchanged_settings_reuse_the_cache_and_cleaning_settings_change_it(fixture_dm, monkeypatch):
    dm = prepared(fixture_dm)
    mtime = (dm.token_dir / "train.bin").stat().st_mtime_ns
    monkeypatch.setattr(tokens, "build_tokens", lambda *a, **k: pytest.fail("re-encoded an unchanged cache"))
    again = prepared(fixture_dm, batch_size=8, block_size=16)  # window settings are not part of the key
    assert again.token_dir == dm.token_dir and (dm.token_dir / "train.bin").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    other = prepared(fixture_dm, min_paragraph_chars=60)
    assert other.token_dir != dm.token_dir and dm.token_dir.exists()


def test_random_paragraph_split_is_deterministic(fixture_dm, tmp_path):
    a = prepared(fixture_dm, split="random_paragraphs", root=str(tmp_path / "a"))
    b = prepared(fixture_dm, split="random_paragraphs", root=str(tmp_path / "b"))
    assert (a.token_dir / "val.bin").read_bytes() == (b.token_dir / "val.bin").read_bytes()
    c = prepared(fixture_dm, split="random_paragraphs", split_seed=1, root=str(tmp_path / "c"))
    assert set(split_paragraphs_of(a, "val")) != set(split_paragraphs_of(c, "val"))
    contiguous = prepared(fixture_dm, root=str(tmp_path / "d"))
    assert set(split_paragraphs_of(a, "val")) != set(split_paragraphs_of(contiguous, "val"))


def test_relative_root_resolves_against_the_working_directory(fixture_dm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fixture_dm(root="rel").root == tmp_path / "rel"


def test_empty_corpus_names_the_books(fixture_dm):
    with pytest.raises(UserError, match=r"90001 \(Livro 1\), 90002 \(Livro 2\), 90003.*min_paragraph_chars=100000"):
        fixture_dm(min_paragraph_chars=100_000).prepare_data()


def test_split_shorter_than_a_window_names_split_tokens_and_block_size(fixture_dm):
    dm = fixture_dm(block_size=20_000)  # train (~107k tokens) holds windows, val (~14k) does not
    dm.prepare_data()
    with pytest.raises(UserError, match=r"the val split has \d+ tokens.*block_size \+ 1 = 20001.*val_fraction"):
        dm.setup("fit")


def test_unknown_encoding_fails_before_any_download(fixture_dm, gutenberg_server):
    with pytest.raises(UserError, match="'nope'"):
        fixture_dm(encoding="nope").prepare_data()
    assert gutenberg_server.requests == []


def test_unwritable_root_fails_before_any_download(fixture_dm, gutenberg_server, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=f"data.root={tmp_path / 'afile' / 'data'} is not writable"):
        fixture_dm(root=str(tmp_path / "afile" / "data")).prepare_data()
    assert gutenberg_server.requests == []


def test_bad_split_settings_are_refused(fixture_dm):
    with pytest.raises(UserError, match="val_fraction"):
        fixture_dm(val_fraction=1.5).prepare_data()
    with pytest.raises(UserError, match="'sideways'"):
        fixture_dm(split="sideways").prepare_data()


def test_setup_before_prepare_says_what_to_run(fixture_dm):
    with pytest.raises(UserError, match="prepare"):
        fixture_dm().setup("fit")


@pytest.mark.slow
def test_all_twelve_real_books_with_gpt2(copy_shared_books, gutenberg_server, tmp_path, require_encoding):
    require_encoding("gpt2")
    dm = MachadoDataModule(books=copy_shared_books, base_url=gutenberg_server.base_url, root=str(tmp_path / "data"),
                           encoding="gpt2", block_size=128, pause=0, backoff_factor=0.001)
    meta = dm.prepare_data()
    dm.setup()
    assert len(meta["books"]) == 12 and meta["dtype"] == "uint16"
    for book in meta["books"]:
        text = (tmp_path / "data" / "clean" / f"{book['id']}.txt").read_text()
        for junk in ("Gutenberg", "Produced by", "[Illustration", "[Footnote"):
            assert junk not in text, (book["id"], junk)
        assert 0.7 < book["clean_chars"] / book["raw_bytes"] < 1, book
        assert 50_000 < sum(book["tokens"].values()) < 250_000, book
    total = sum(meta["tokens"].values())
    assert 1_000_000 < total < 2_000_000
    assert 0.08 < meta["tokens"]["val"] / total < 0.12 and 0.08 < meta["tokens"]["test"] / total < 0.12
    assert len(dm.datasets["val"]) == (meta["tokens"]["val"] - 129) // 128 + 1


def test_a_file_without_gutenberg_markers_is_named(fixture_dm, fixture_corpus, gutenberg_server):
    gutenberg_server.add_book(90004, b"<html>Service temporarily unavailable</html>")
    with pytest.raises(UserError, match=r"book 90004 \(.*90004\.txt\) is not a Project Gutenberg text: no '\*\*\*"):
        fixture_dm(books=[*fixture_corpus[1], 90004]).prepare_data()


def test_a_train_split_that_cannot_fill_one_batch_is_refused_with_the_numbers(fixture_dm):
    dm = fixture_dm(block_size=1000, batch_size=200)  # 107 train windows: drop_last would leave 0 batches
    dm.prepare_data()
    with pytest.raises(UserError, match=r"the train split has 107 windows of data\.block_size=1000 tokens .*fewer than "
                                        r"one batch of data\.batch_size=200: .*lower data\.batch_size"):
        dm.setup("fit")
    dm.setup("test")  # evaluation keeps its last partial batch: a test split of a few windows is fine


def test_one_batch_per_process_is_needed_under_ddp(fixture_dm):
    from types import SimpleNamespace

    dm = fixture_dm(block_size=1000, batch_size=60)  # 107 windows: 1 batch on 1 process, 0 on each of 2
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(UserError, match=r"107 windows .*data\.batch_size=60 per process x 2 processes = 120"):
        dm.setup("fit")


def test_random_binary_between_gutenberg_markers_is_refused_with_the_book_id(fixture_dm, fixture_corpus,
                                                                          gutenberg_server):
    import random

    noise = random.Random(0).randbytes(40_000)
    gutenberg_server.add_book(90004, b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + noise
                              + b"\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n")
    with pytest.raises(UserError, match=r"book 90004 \(.*90004\.txt\) does not look like a book: [\d,]+ of the "
                                        r"[\d,]+ characters .* are control characters.*drop 90004 from data\.books"):
        fixture_dm(books=[*fixture_corpus[1], 90004]).prepare_data()


def test_a_stub_between_gutenberg_markers_is_refused_with_the_book_id(fixture_dm, fixture_corpus, gutenberg_server,
                                                                    make_gutenberg_text):
    from gpt_lightning.data.clean import MIN_BOOK_CHARS

    stub = ["Este livro ainda nao esta disponivel nesta colecao; volte mais tarde, por favor."] * 3
    gutenberg_server.add_book(90004, make_gutenberg_text("Stub", stub))
    with pytest.raises(UserError, match=rf"book 90004 .*does not look like a book: only 2[\d,]+ characters of text "
                                        rf".*fewer than the {MIN_BOOK_CHARS:,}"):
        fixture_dm(books=[*fixture_corpus[1], 90004]).prepare_data()


def test_the_saved_root_is_absolute(fixture_dm, tmp_path, monkeypatch):
    """A checkpoint stores dm.hparams (Lightning's datamodule_hyper_parameters): `evaluate` run from another
    directory must find the same cache, not download the corpus into a new relative folder."""
    monkeypatch.chdir(tmp_path)
    dm = fixture_dm(root="rel")
    assert dm.hparams.root == str(tmp_path / "rel") == str(dm.root)
    monkeypatch.chdir(tmp_path / "..")
    assert MachadoDataModule(**dm.hparams).root == tmp_path / "rel"
