"""`python -m gpt_lightning.prepare`: the real Hydra entry point, run as a user would."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def prepare(cwd, *overrides):
    return subprocess.run([sys.executable, "-m", "gpt_lightning.prepare", *overrides, f"hydra.run.dir={cwd}/run"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_prints_one_row_per_book_and_totals(fixture_corpus, tmp_path):
    base_url, ids = fixture_corpus
    r = prepare(tmp_path, f"data.base_url={base_url}", f"data.books=[{','.join(map(str, ids))}]",
                "data.root=rel_data", "data.encoding=bytes", "data.pause=0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for book, title in zip(ids, ("Livro 1", "Livro 2", "Livro 3")):
        assert sum(l.split()[:3] == [str(book), *title.split()] for l in lines) == 1
    assert any(l.split()[:2] == ["total", "3"] for l in lines)
    assert "tokens per split: train " in r.stdout
    assert f"tokens/ {tmp_path / 'rel_data' / 'tokens' / 'bytes-'}" in r.stdout  # relative to the launch dir
    assert (tmp_path / "rel_data" / "clean" / f"{ids[0]}.txt").exists()


def test_bad_encoding_exits_2_with_one_line(tmp_path):
    r = prepare(tmp_path, "data.encoding=nope", f"data.root={tmp_path}/data")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "'nope'" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_a_mistyped_key_exits_2_with_one_line(tmp_path):
    r = prepare(tmp_path, "data.batchsize=8", f"data.root={tmp_path}/data")
    assert r.returncode == 2, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "batchsize" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr
    assert not (tmp_path / "data").exists()
