"""Shared fixtures: a loopback Gutenberg server, generated Gutenberg-format books, the real corpus."""

import http.server
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import gpt_lightning.training.model_config  # noqa: F401  (config schemas and resolvers, for hydra.compose)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _tiktoken_cache():
    """Let tiktoken find gpt2/cl100k_base/o200k_base offline (../shared/tiktoken_cache)."""
    cache = SHARED / "tiktoken_cache"
    if cache.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield


def fit_briefly(model, x, y, steps: int, lr: float = 3e-3):
    """Plain AdamW steps on one fixed batch (tiny models in unit tests); returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


@pytest.fixture(autouse=True)
def _no_tokenizer_downloads(monkeypatch):
    """No test touches the internet: tiktoken may read its cache, never fetch (an uncached encoding fails)."""
    import tiktoken.load

    def offline(blobpath):
        raise ConnectionError(f"tests never download tokenizer files ({blobpath})")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)


@pytest.fixture
def require_encoding():
    """require_encoding(name): the test skips, saying why, when the tiktoken cache lacks that encoding."""
    from gpt_lightning.common.errors import UserError
    from gpt_lightning.data.tokens import get_encoding

    def require(name: str):
        try:
            return get_encoding(name)
        except UserError:
            pytest.skip(f"tiktoken encoding {name!r} is not in the cache (TIKTOKEN_CACHE_DIR="
                        f"{os.environ.get('TIKTOKEN_CACHE_DIR')}) and tests never download it")

    return require


class GutenbergServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving `root` laid out as Gutenberg's URLs.

    .requests lists every path asked for (.request_headers their headers);
    .fail(path, [503, ...]) answers those statuses first;
    .truncate(path, times) sends a Content-Length larger than the body and closes, `times` times.
    """

    def __init__(self, root: Path):
        self.root, self.requests, self.request_headers = root, [], []
        self._lock = threading.Lock()
        self._fail: dict[str, list[int]] = {}
        self._truncate: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests.append(self.path)
                    server.request_headers.append(dict(self.headers))
                    status = server._fail[self.path].pop(0) if server._fail.get(self.path) else None
                    cut = server._truncate.get(self.path, 0)
                    if cut:
                        server._truncate[self.path] = cut - 1
                file = server.root / self.path.lstrip("/")
                if status is None and not file.is_file():
                    status = 404
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body) + (1000 if cut else 0)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if cut else body)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def path_for(book_id, layout: str = "cache") -> str:
        return {"cache": f"/cache/epub/{book_id}/pg{book_id}.txt", "files": f"/files/{book_id}/{book_id}-0.txt"}[layout]

    def add_book(self, book_id, raw: bytes, layout: str = "cache") -> str:
        path = self.path_for(book_id, layout)
        file = self.root / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(raw)
        return path

    def fail(self, path: str, statuses: list[int]) -> None:
        with self._lock:
            self._fail[path] = list(statuses)

    def truncate(self, path: str, times: int = 1) -> None:
        with self._lock:
            self._truncate[path] = times

    def requests_for(self, path: str) -> int:
        with self._lock:
            return self.requests.count(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def gutenberg_server(tmp_path_factory):
    server = GutenbergServer(tmp_path_factory.mktemp("gutenberg_site"))
    yield server
    server.close()


LICENCE = ("This eBook is for the use of anyone anywhere at no cost and with almost no restrictions "
           "whatsoever. You may copy it, give it away or re-use it under the terms of the Project "
           "Gutenberg License included with this eBook or online at www.gutenberg.org")


def gutenberg_text(title: str, paragraphs: list[str], wording: str = "THIS", bom: bool = True,
                        crlf: bool = True, credits: bool = True, licence: bool = True,
                        illustration: bool = True) -> bytes:
    """A small book in Project Gutenberg's plain-text format, hard-wrapped at 70 columns."""
    wrap = lambda s: textwrap.fill(s, 70)  # noqa: E731
    head = [f"The Project Gutenberg EBook of {title}, by Machado de Assis", wrap(LICENCE)] if licence else []
    head += [f"Title: {title}", "Author: Machado de Assis", "Release Date: May 1, 2017 [EBook #99999]",
             "Language: Portuguese", f"*** START OF {wording} PROJECT GUTENBERG EBOOK {title.upper()} ***"]
    if credits:
        head.append(wrap("Produced by Laura Natal Rodriguez & Marc D'Hooghe at Free Literature "
                         "(online soon in an extended version, also linking to free sources)"))
    if illustration:
        head.append("[Illustration: Machado de Assis]")
    body = [wrap(p) for p in paragraphs]
    tail = []
    if licence:
        tail.append(f"End of the Project Gutenberg EBook of {title}, by\nMachado de Assis")
    tail.append(f"*** END OF {wording} PROJECT GUTENBERG EBOOK {title.upper()} ***")
    if licence:
        tail += ["***** This file should be named 99999-0.txt or 99999-0.zip *****",
                 wrap("Updated editions will replace the previous one--the old editions will be renamed. "
                      + LICENCE)]
    text = "\n\n\n".join(head + body + tail) + "\n"
    if crlf:
        text = text.replace("\n", "\r\n")
    return ("\ufeff" if bom else "").encode() + text.encode("utf-8")


WORDS = ("casa rua noite dia moça rapaz olhos mão coração tempo vida alma carta jardim janela sala "
         "viagem cidade amigo senhora conselheiro padre livro sorriso lagrima verdade saudade "
         "tarde manhã chapéo bairro theatro familia destino segredo silencio").split()
VERBS = "disse olhou viu sentiu pensou esperou escreveu lembrou amou deixou achou trouxe perdeu".split()


def portuguese_paragraphs(seed: int, n: int) -> list[str]:
    """n distinct, deterministic Portuguese-like paragraphs of ~300-600 characters."""
    rng = random.Random(seed)
    paras = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            words = " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))
            sentences.append(f"{rng.choice(['O', 'A', 'Um', 'Uma'])} {rng.choice(WORDS)} {rng.choice(VERBS)} "
                             f"{rng.choice(['a', 'o', 'uma'])} {rng.choice(WORDS)} {rng.choice(['da', 'do', 'com a'])} "
                             f"{rng.choice(WORDS)}{rng.choice([',', ';', '.'])} {words}.")
        paras.append(f"--Capitulo {seed}.{i}: " + " ".join(sentences))
    return paras


@pytest.fixture
def make_gutenberg_text():
    """The `gutenberg_text(title, paragraphs, wording=, bom=, crlf=, credits=, licence=, illustration=)` builder."""
    return gutenberg_text


@pytest.fixture
def fixture_corpus(gutenberg_server):
    """3 generated books (~40 KB each) served by `gutenberg_server`: (base_url, [ids])."""
    ids = [90001, 90002, 90003]
    for k, book in enumerate(ids):
        raw = gutenberg_text(f"Livro {k + 1}", portuguese_paragraphs(book, 90), wording=("THIS", "THE")[k % 2])
        gutenberg_server.add_book(book, raw, layout=("cache", "files")[k % 2])
    return gutenberg_server.base_url, ids


@pytest.fixture(scope="session")
def shared_gutenberg() -> Path:
    """The 12 real raw books beside the repo (../shared/gutenberg); skips when absent."""
    path = SHARED / "gutenberg"
    if not path.is_dir():
        pytest.skip(f"{path} not found (the real Machado corpus lives beside the repo in CI)")
    return path


@pytest.fixture
def fixture_dm(fixture_corpus, tmp_path):
    """make(**overrides) -> a MachadoDataModule over `fixture_corpus` for fast tests (bytes encoding,
    block_size 32, no pauses, tiny backoff), its root under tmp_path."""
    from gpt_lightning.data import MachadoDataModule

    base_url, ids = fixture_corpus

    def make(**overrides):
        kw = dict(books=ids, base_url=base_url, root=str(tmp_path / "data"), encoding="bytes", block_size=32,
                  batch_size=4, retries=3, backoff_factor=0.001, pause=0, timeout=(5, 10))
        return MachadoDataModule(**{**kw, **overrides})

    return make


@pytest.fixture
def copy_shared_books(shared_gutenberg, gutenberg_server):
    """Serve the real books from a temp copy (never the repo); returns their IDs."""
    ids = sorted(p.stem for p in shared_gutenberg.glob("*.txt"))
    for book in ids:
        gutenberg_server.add_book(book, (shared_gutenberg / f"{book}.txt").read_bytes())
    return [int(b) for b in ids]



TRAIN_BOOKS = [91001, 91002]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two generated books on a loopback server, and one data.root shared by a test module's training runs."""
    server = GutenbergServer(tmp_path_factory.mktemp("site"))
    for book in TRAIN_BOOKS:
        server.add_book(book, gutenberg_text(f"Livro {book}", portuguese_paragraphs(book, 120)))
    yield server, tmp_path_factory.mktemp("data")
    server.close()


def train_command(corpus, *overrides: str, multirun: bool = False) -> list[str]:
    """`python -m gpt_lightning.train` as a user types it, tiny (experiment=debug), on the CPU, over `corpus`."""
    server, data_root = corpus
    return [sys.executable, "-m", "gpt_lightning.train", *(["-m"] if multirun else []), "experiment=debug",
            f"data.base_url={server.base_url}", f"data.books=[{','.join(map(str, TRAIN_BOOKS))}]",
            f"data.root={data_root}", "data.pause=0", "trainer.accelerator=cpu",
            "callbacks.progress_bar.refresh_rate=0", *overrides]


TRAIN_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
if (SHARED / "tiktoken_cache").is_dir():  # the subprocesses find the offline encodings too
    TRAIN_ENV.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def run_train(corpus, cwd, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(corpus, *overrides, multirun=multirun), cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=TRAIN_ENV)
