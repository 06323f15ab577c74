"""Gutenberg book IDs -> (x, y) token windows: fetch, clean, split, tokenise, window.

Layout under data.root: raw/<ID>.txt (as downloaded), clean/<ID>.txt (what the model reads),
tokens/<key>/{train,val,test}.bin + meta.json. prepare_data (rank 0) downloads and writes and sets no
state; setup (every rank) only reads. Bad settings raise UserError there, not in __init__ (Hydra's
instantiate would wrap the error). Both verify the token cache against meta.json before use; only
prepare_data rebuilds a damaged one. Nothing is written (nor checked for writability) that is already
complete, so a finished cache works read-only.
"""

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from gpt_lightning.data.clean import CLEAN_VERSION, MIN_BOOK_CHARS, NotABook, book_text, clean_book
from gpt_lightning.data.fetch import check_base_url, check_http, fetch_books
from gpt_lightning.data.tokens import (SPLITS, DamagedCache, build_tokens, cache_key, check_fractions, get_encoding,
                                       split_paragraphs, verify_tokens)
from gpt_lightning.data.sampler import ShardedSampler
from gpt_lightning.data.windows import TokenWindows
from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import atomic_write_text

log = logging.getLogger(__name__)


def resolve_root(root) -> Path:
    """Relative paths resolve against the launch directory (Hydra's original cwd when Hydra runs)."""
    return Path(to_absolute_path(os.path.expanduser(str(root)))).resolve()


class MachadoDataModule(L.LightningDataModule):
    def __init__(self, books, base_url: str = "https://www.gutenberg.org", root: str = "data",
                 encoding: str = "gpt2", split: str = "contiguous", val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 42, min_paragraph_chars: int = 50,
                 block_size: int = 128, train_stride: int | None = None, batch_size: int = 16,
                 num_workers: int = 0, seed: int | None = 1337, timeout=(10, 60), retries: int = 5,
                 backoff_factor: float = 1.0, pause: float = 1.0):
        super().__init__()
        # Only global rank 0 downloads and writes; multi-node runs need data.root on a shared filesystem.
        self.prepare_data_per_node = False
        # save_hyperparameters reads the arguments from this frame's locals: the saved root (checkpoints'
        # datamodule_hyper_parameters) is the absolute one, so evaluate run elsewhere finds the same cache.
        root = str(resolve_root(root))
        self.save_hyperparameters()
        self.root = Path(root)
        self.meta: dict | None = None        # set by setup
        self.token_dir: Path | None = None   # set by setup
        self.datasets: dict[str, TokenWindows] = {}
        self._resumed_windows_per_step: int | None = None  # from a checkpoint being resumed

    # -- tokenizer (lazy, cached per process by get_encoding; no state on self) --
    @property
    def tokenizer(self):
        return get_encoding(self.hparams.encoding)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def eot_token(self) -> int:
        return self.tokenizer.eot_token

    # -- checks and paths --
    @property
    def books(self) -> list[int]:
        return [int(b) for b in self.hparams.books]

    def _check(self) -> None:
        """Every setting that can be checked cheaply, before any download or encoding."""
        h = self.hparams
        if not h.books or not all(str(b).isdigit() for b in h.books):
            raise UserError(f"data.books={list(h.books or [])} must be a non-empty list of Gutenberg book IDs "
                            "(numbers)")
        check_base_url(h.base_url)
        check_http(h.timeout, h.retries, h.backoff_factor, h.pause)
        check_fractions(h.val_fraction, h.test_fraction)
        split_paragraphs(0, h.split, h.val_fraction, h.test_fraction, 0)  # validates the split name
        if not (isinstance(h.block_size, int) and h.block_size > 0):
            raise UserError(f"data.block_size={h.block_size} must be a positive integer")
        if h.train_stride is not None and not (isinstance(h.train_stride, int) and h.train_stride > 0):
            raise UserError(f"data.train_stride={h.train_stride} must be null or a positive integer")
        self.tokenizer  # unknown or unloadable encoding: fail now

    def _check_writable(self, folder: Path) -> None:
        """Called only when something must be written into `folder` (a complete cache may be read-only)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"data.root={self.root} is not writable ({e.strerror or e}): {folder} must be written; "
                            "choose another data.root or make it writable") from e

    def _raw(self) -> dict[int, bytes]:
        raw = {}
        for b in self.books:
            path = self.root / "raw" / f"{b}.txt"
            if not path.exists():
                raise UserError(f"book {b} is not downloaded ({path}); run prepare_data() first "
                                "(python -m gpt_lightning.prepare)")
            raw[b] = path.read_bytes()
        return raw

    def _cache_inputs(self, raw: dict[int, bytes]) -> dict:
        """Everything the token files depend on: a change here means a new tokens/<key>/."""
        h = self.hparams
        return {"clean_version": CLEAN_VERSION, "encoding": h.encoding, "books": self.books,
                "raw_sha256": {str(b): hashlib.sha256(data).hexdigest() for b, data in raw.items()},
                "min_paragraph_chars": h.min_paragraph_chars, "split": h.split,
                "val_fraction": h.val_fraction, "test_fraction": h.test_fraction,
                "split_seed": h.split_seed if h.split == "random_paragraphs" else None}

    def _clean(self, raw: dict[int, bytes]) -> list[dict]:
        """Clean every book (refusing what is not plausibly one), writing clean/<ID>.txt where it changed."""
        h = self.hparams
        clean_dir = self.root / "clean"
        books = []
        for b, data in raw.items():
            path = self.root / "raw" / f"{b}.txt"
            try:
                title, paragraphs = clean_book(data, h.min_paragraph_chars, min_book_chars=MIN_BOOK_CHARS)
            except NotABook as e:
                raise UserError(f"book {b} ({path}) does not look like a book: {e}; delete the file to download "
                                f"it again, or drop {b} from data.books") from e
            except ValueError as e:
                raise UserError(f"book {b} ({path}) is not a Project Gutenberg text: {e}; "
                                "delete the file to download it again") from e
            text = book_text(paragraphs)
            target = clean_dir / f"{b}.txt"
            if not (target.is_file() and target.read_bytes() == text.encode("utf-8")):
                self._check_writable(clean_dir)
                try:
                    atomic_write_text(target, text)
                except OSError as e:
                    raise UserError(f"could not write {target}: {e.strerror or e}") from e
            books.append({"id": b, "title": title or f"Gutenberg #{b}", "raw_bytes": len(data),
                          "clean_chars": len(text), "paragraphs": paragraphs})
        empty = [f"{b['id']} ({b['title']})" for b in books if not b["paragraphs"]]
        if empty:
            raise UserError(f"no text left after cleaning in book(s) {', '.join(empty)}: no paragraph of at least "
                            f"data.min_paragraph_chars={h.min_paragraph_chars} characters; lower it or drop the book")
        return books

    # -- Lightning hooks --
    def prepare_data(self) -> dict:
        """Rank 0: download, clean (writing clean/), split and tokenise. Returns meta; sets nothing on self.

        A token cache that fails verification is rebuilt here, with one warning naming the file. Under DDP,
        Lightning runs this on global rank 0 only, and every rank waits at a barrier before setup.
        """
        h = self.hparams
        self._check()
        raw_dir = self.root / "raw"
        if any(not (raw_dir / f"{b}.txt").exists() for b in self.books):
            self._check_writable(raw_dir)
        fetch_books(self.books, raw_dir, h.base_url, h.timeout, h.retries, h.backoff_factor, h.pause)
        raw = self._raw()
        inputs = self._cache_inputs(raw)
        token_dir = self.root / "tokens" / cache_key(inputs)
        books = self._clean(raw)

        if os.path.lexists(token_dir):
            try:
                return verify_tokens(token_dir, self.vocab_size)  # same inputs, intact: reuse without re-encoding
            except DamagedCache as e:
                log.warning("damaged token cache: %s; rebuilding %s from %s", e, token_dir.name, raw_dir)
        self._check_writable(token_dir.parent)
        labels = {b["id"]: split_paragraphs(len(b["paragraphs"]), h.split, h.val_fraction, h.test_fraction,
                                            [h.split_seed, b["id"]]) for b in books}
        return build_tokens(token_dir, self.tokenizer, books, labels, inputs)

    def setup(self, stage: str | None = None) -> None:
        """Every rank: verify and open the token files of this configuration; check each needed split is usable."""
        h = self.hparams
        self._check()
        token_dir = self.root / "tokens" / cache_key(self._cache_inputs(self._raw()))
        if not os.path.lexists(token_dir):
            raise UserError(f"no token cache at {token_dir}; run prepare_data() first "
                            "(python -m gpt_lightning.prepare)")
        # setup never rebuilds: under DDP it runs on every rank at once, and ranks rebuilding (or reading while
        # one rebuilds) would race. prepare_data (rank 0, before the barrier) is the one writer; damage found
        # here appeared after it ran, or prepare was skipped.
        try:
            self.meta = verify_tokens(token_dir, self.vocab_size)
        except DamagedCache as e:
            raise UserError(f"damaged token cache: {e}; run `python -m gpt_lightning.prepare` with the same data "
                            "settings (or prepare_data()) to rebuild it") from None
        self.token_dir = token_dir
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(stage, SPLITS)
        share = {"train": 1.0, "val": h.val_fraction, "test": h.test_fraction}
        world = self.trainer.world_size if self.trainer is not None else 1
        for s in SPLITS:
            ds = TokenWindows(token_dir / f"{s}.bin", self.meta["dtype"], h.block_size,
                              h.train_stride if s == "train" else None)
            if s in needed and share[s] > 0 and len(ds) == 0:
                more = "smaller val/test fractions" if s == "train" else f"a larger data.{s}_fraction"
                raise UserError(f"the {s} split has {ds.n_tokens} tokens, fewer than one window of "
                                f"data.block_size + 1 = {h.block_size + 1}; use a smaller block_size, "
                                f"more books (data.books) or {more}")
            if s == "train" and s in needed and len(ds) // world < h.batch_size:
                # The train loader drops the last partial batch: fewer windows than one batch = zero steps.
                per = f" per process x {world} processes = {h.batch_size * world}" if world > 1 else ""
                raise UserError(f"the train split has {len(ds)} windows of data.block_size={h.block_size} tokens "
                                f"(one every {ds.stride}), fewer than one batch of data.batch_size={h.batch_size}"
                                f"{per}: no training step could run; lower data.batch_size, data.block_size or "
                                "data.train_stride, or add books (data.books)")
            self.datasets[s] = ds

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        h = self.hparams
        sampler = ShardedSampler(len(self.datasets[split]), shuffle=train, seed=h.seed, equal_shards=train)
        if train and self.trainer is not None:
            # Resuming mid-epoch (ckpt_path=last): the loop progress is restored before this is called (the
            # module asks for the schedule's length only at the first step, so nothing builds this loader
            # earlier), so skip the windows the interrupted run already trained on in this epoch.
            per_step = h.batch_size * self.trainer.world_size
            if self._resumed_windows_per_step not in (None, per_step):
                raise UserError(f"resuming with data.batch_size={h.batch_size} on {self.trainer.world_size} "
                                f"process(es) = {per_step} windows per step, but the checkpoint trained with "
                                f"{self._resumed_windows_per_step}: its data position cannot be restored; resume "
                                f"with the same batch size and devices, or use init_from= to start a new run")
            # Lightning private API (no public "batches done in this epoch"): the fit loop's progress counters.
            # Pinned by tests/test_lightning_internals.py.
            loop = self.trainer.fit_loop
            sampler.set_epoch(loop.epoch_progress.current.processed)
            sampler.start = loop.epoch_loop.batch_progress.current.ready * h.batch_size
        on_gpu = torch.cuda.is_available() and isinstance(getattr(self.trainer, "accelerator", None), CUDAAccelerator)
        return DataLoader(self.datasets[split], batch_size=h.batch_size, sampler=sampler, drop_last=train,
                          num_workers=h.num_workers, pin_memory=on_gpu, persistent_workers=h.num_workers > 0)

    def state_dict(self) -> dict:
        """Saved in checkpoints: how many windows one step consumed, so a resume can restore the data position."""
        world = self.trainer.world_size if self.trainer is not None else 1
        return {"windows_per_step": self.hparams.batch_size * world}

    def load_state_dict(self, state: dict) -> None:
        self._resumed_windows_per_step = state.get("windows_per_step")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
