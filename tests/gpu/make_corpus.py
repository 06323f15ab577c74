"""Write a small generated corpus into <root>/raw/ so a GPU machine (no internet) can train: books already in
raw/ are never fetched. Usage: python tests/gpu/make_corpus.py ROOT -> prints the data.books override."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import gutenberg_text, portuguese_paragraphs  # noqa: E402

root = Path(sys.argv[1]) / "raw"
root.mkdir(parents=True, exist_ok=True)
ids = [93001, 93002, 93003, 93004]
for book in ids:
    (root / f"{book}.txt").write_bytes(gutenberg_text(f"Livro {book}", portuguese_paragraphs(book, 600)))
print(f"data.books=[{','.join(map(str, ids))}]")
