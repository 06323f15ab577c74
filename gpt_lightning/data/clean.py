"""Project Gutenberg plain text -> the paragraphs the model reads. Pure functions, no I/O.

Cleaning policy (bump CLEAN_VERSION whenever it changes: it is part of the token-cache key):

- Bytes are decoded as UTF-8 (a BOM is dropped; Gutenberg's old 8-bit files fall back to Latin-1),
  CRLF/CR become LF, and the text is put in Unicode NFC.
- Only the text between the "*** START OF THIS/THE PROJECT GUTENBERG EBOOK ... ***" and
  "*** END OF ... ***" markers is kept: the licence header and footer are gone.
- A book must be plausible text (NotABook otherwise): at most 1 % of the characters between the markers
  may be control characters (other than tab, newline, CR, FF, VT) or U+FFFD (random binary has ~11 %,
  the 12 books none); and, with min_book_chars (the DataModule passes MIN_BOOK_CHARS = 1,000), at
  least that many characters must be left after cleaning (before the min_paragraph_chars filter):
  less is a stub, an error page or a cut file, not a book (the shortest of the 12 keeps ~200,000).
- Apparatus is dropped: the "End of the Project Gutenberg EBook of ..." paragraph, producer credits
  ("Produced by ...", "Produced by: ..."); transcriber notes (a "Notas" heading followed by a note
  such as "Os erros óbvios ... foram corrigidos" ends the book there); bracketed tags such as
  [Illustration: ...], [Ilustração], [signature], [added part of sentence]; whole [Footnote N: ...]
  blocks (multi-line, nested brackets allowed) and inline footnote markers [1]; tables of contents
  (a block headed INDICE/ÍNDICE/Index/Summario, or the publisher's "OBRAS DO AUTOR" list, and the
  line-list blocks after it up to the next prose paragraph); and, as a safety net, any paragraph
  that still mentions Project Gutenberg.
- Markup: HTML character references with their ";" are decoded ("&amp;" -> "&", "&quot;" -> '"',
  "&atilde;" -> "ã", "&#233;" -> "é", "&nbsp;" -> no-break space; the rules below then apply to what
  they become); a bare "&" is left alone. _italic_ underscores are removed; the transcribers' * and **
  markers are removed (the book's own "***", an elided name as in "frei ***", is kept).
- Punctuation:
  dashes    "--" (any run of two or more hyphens) becomes the em dash "—" (the travessão of
            dialogue); single hyphens (disse-lhe, guarda-chuva) are kept;
  quotes    straight and curly double quotes become the guillemets the books mostly use:
            "«" when opening (start of a line, or after a space, bracket or dash), "»" otherwise;
            curly single quotes become "'" (the books' elision mark: n'uma, d'elle);
  ellipsis  "…" becomes "..." (the books' own form).
  Tabs and no-break spaces become spaces; runs of spaces collapse to one.
- Paragraphs are the blank-line separated blocks. Hard-wrapped prose lines are joined with a space
  (no space after a line-final dash). A block whose lines are all clearly shorter than the book's
  wrap width (every line under 80 % of it; the width is the 99th percentile of line lengths, at
  least 60) is verse or a list: its line breaks are kept, indentation dropped.
- Paragraphs shorter than `min_paragraph_chars` characters (headings, chapter numbers, title-page
  lines) are dropped. The caller ends each book with <|endoftext|>.
"""

import html
import re
import unicodedata

CLEAN_VERSION = 2  # 2: HTML character references decoded
EOT = "<|endoftext|>"
MIN_BOOK_CHARS = 1_000
NON_TEXT_SHARE = 0.01

_START = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG EBOOK.*\*\*\*[ \t]*$", re.M | re.I)
_END = re.compile(r"^\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG EBOOK.*\*\*\*[ \t]*$", re.M | re.I)
_TITLE = re.compile(r"^Title:[ \t]*(.+)$", re.M)
# Bracketed apparatus; the whole bracket (to its matching "]") goes.
_TAG = re.compile(r"\[(?:Footnote|Sidenote|Illustra|Ilustra|Transcri|Nota do transcritor|signature|assinatura"
                  r"|added |Blank Page)", re.I)
_MARKER = re.compile(r"\[\d+\]")
# Paragraphs that are apparatus as a whole.
_DROP = re.compile(r"^(?:End of (?:the )?Project Gutenberg|Produced by)|Project Gutenberg|gutenberg\.org", re.I)
_NOTE = re.compile(r"^Transcriber'?s? notes?|erros? (?:óbvios|tipográficos).*corrigid|Nota do transcritor", re.I)
_NOTE_HEADING = re.compile(r"^(?:notas?|notes?)[.:]?$", re.I)
_TOC = re.compile(r"^(?:[IÍ]ndice|Index|Summario|Sumário|Obras do autor)\.?$", re.I)
# Only references closed by ";": html.unescape alone would also turn "&notas" into "¬as" (HTML5 legacy names).
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_NON_TEXT = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufffd]")


class NotABook(ValueError):
    """Between valid Gutenberg markers, but not plausibly a book (binary data, or next to no text)."""


def decode_text(raw: bytes) -> str:
    """Bytes -> NFC text with LF line ends."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def title_of(text: str) -> str | None:
    """The book's title from its header's "Title:" line."""
    m = _TITLE.search(text)
    return m.group(1).strip() if m else None


def body_of(text: str) -> str:
    """What lies between the START and END markers; ValueError when a marker is missing."""
    start = _START.search(text)
    if not start:
        raise ValueError("no '*** START OF THE PROJECT GUTENBERG EBOOK ... ***' line")
    end = _END.search(text, start.end())
    if not end:
        raise ValueError("no '*** END OF THE PROJECT GUTENBERG EBOOK ... ***' line")
    return text[start.end():end.start()]


def drop_tags(text: str) -> str:
    """Remove bracketed apparatus (matching nested brackets, across lines) and [N] footnote markers."""
    out, i = [], 0
    while m := _TAG.search(text, i):
        out.append(text[i:m.start()])
        depth, j = 0, m.start()
        while j < len(text):
            depth += {"[": 1, "]": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        i = j
    out.append(text[i:])
    return _MARKER.sub("", "".join(out))


def normalize(text: str) -> str:
    """Markup and punctuation policy (see module docstring) on a whole body."""
    text = _ENTITY.sub(lambda m: html.unescape(m.group()), text).replace("_", "")
    text = re.sub(r"(?<!\*)\*{1,2}(?!\*)", "", text)
    text = re.sub(r"-{2,}", "—", text)
    text = text.replace("…", "...").replace("‘", "'").replace("’", "'")
    text = re.sub(r'(^|[\s(\[{—-])["“„]', r"\1«", text, flags=re.M)
    text = re.sub(r'["“”„]', "»", text)
    return re.sub(r"[\t\u00a0\u202f]", " ", text)


def wrap_width(lines: list[str]) -> int:
    """The book's hard-wrap width: the 99th percentile of non-blank line lengths, at least 60."""
    lengths = sorted(len(l.rstrip()) for l in lines if l.strip())
    return max(60, lengths[int(0.99 * (len(lengths) - 1))] if lengths else 0)


def paragraphs(body: str, min_chars: int) -> list[str]:
    """A marker-free body -> cleaned paragraphs of at least `min_chars` characters."""
    text = normalize(drop_tags(body))
    width = wrap_width(text.split("\n"))
    kept, in_toc = [], False
    for block in re.split(r"\n\s*\n", text):
        lines = [re.sub(r" {2,}", " ", l.strip()) for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        first = " ".join(lines)
        if _NOTE.search(first) and kept and _NOTE_HEADING.match(kept[-1]):
            kept.pop()  # a "Notas" heading then a transcriber's note: that section runs to the end
            break
        if _DROP.search(first) or _NOTE.search(first):
            continue
        short = [len(l) < 0.8 * width for l in lines]
        if _TOC.match(lines[0]):
            in_toc = True  # a table of contents runs to the next block with a full-width (prose) line
        if in_toc and all(short):
            continue
        in_toc = False
        # verse or a list keeps its line breaks; hard-wrapped prose is joined (no space after a dash)
        kept.append("\n".join(lines) if len(lines) > 1 and all(short)
                    else re.sub(r"(?<=—)\n", "", "\n".join(lines)).replace("\n", " "))
    paras = [unicodedata.normalize("NFC", p) for p in kept if re.search(r"\w", p)]
    return [p for p in paras if len(p) >= min_chars]


def check_text(body: str) -> None:
    """NotABook when more than NON_TEXT_SHARE of the body is control characters or U+FFFD (binary data)."""
    bad = _NON_TEXT.findall(body)
    if len(bad) > NON_TEXT_SHARE * len(body):
        first = _NON_TEXT.search(body)
        raise NotABook(f"{len(bad):,} of the {len(body):,} characters between the markers are control characters "
                       f"or undecodable bytes (the first, {first.group()!r}, at character {first.start():,}): "
                       "binary data, not text")


def clean_book(raw: bytes, min_paragraph_chars: int = 50, min_book_chars: int = 0) -> tuple[str | None, list[str]]:
    """Raw Gutenberg bytes -> (title, paragraphs). ValueError when the START/END markers are missing,
    NotABook (a ValueError) when the body is binary or, after cleaning, shorter than min_book_chars."""
    text = decode_text(raw)
    body = body_of(text)
    check_text(body)
    paras = paragraphs(body, 0)
    chars = sum(len(p) for p in paras)
    if chars < min_book_chars:
        raise NotABook(f"only {chars:,} characters of text are left between the markers after cleaning, fewer "
                       f"than the {min_book_chars:,} of the shortest plausible book: a stub, an error page or a "
                       "cut file")
    return title_of(text), [p for p in paras if len(p) >= min_paragraph_chars]


def book_text(paragraphs: list[str]) -> str:
    """What is kept at clean/<ID>.txt: paragraphs separated by a blank line, then <|endoftext|>."""
    return "\n\n".join(paragraphs + [EOT]) + "\n"
