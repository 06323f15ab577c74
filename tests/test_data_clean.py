"""Cleaning: Gutenberg plain text -> the paragraphs the model reads."""

import textwrap

import pytest

from gpt_lightning.data.clean import NotABook, book_text, clean_book, decode_text, paragraphs, title_of

PROSE = ("Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem da Central um rapaz "
         "aqui do bairro, que eu conheço de vista e de chapéo. Comprimentou-me, sentou-se ao pé de mim.")
OTHER = ("Vi-lhe fazer um gesto para tiral-os outra vez do bolso, mas não passou do gesto; estava amuado. "
         "No dia seguinte entrou a dizer de mim nomes feios, e acabou alcunhando-me Dom Casmurro.")


def body(*blocks: str) -> str:
    return "\n\n".join(blocks)


def test_bom_and_crlf_do_not_change_the_text(make_gutenberg_text):
    plain = clean_book(make_gutenberg_text("Dom Casmurro", [PROSE, OTHER], bom=False, crlf=False))
    assert clean_book(make_gutenberg_text("Dom Casmurro", [PROSE, OTHER], bom=True, crlf=True)) == plain
    assert plain == ("Dom Casmurro", [PROSE, OTHER])


@pytest.mark.parametrize("wording", ["THIS", "THE"])
def test_both_marker_wordings_keep_only_the_book(make_gutenberg_text, wording):
    _, paras = clean_book(make_gutenberg_text("Helena", [PROSE], wording=wording))
    assert paras == [PROSE]


def test_licence_credits_and_illustrations_are_removed(make_gutenberg_text):
    text = book_text(clean_book(make_gutenberg_text("Helena", [PROSE]), min_paragraph_chars=0)[1])
    for junk in ("Gutenberg", "Produced by", "Illustration", "licen", "Machado de Assis", "Helena"):
        assert junk not in text
    assert text == PROSE + "\n\n<|endoftext|>\n"


def test_missing_marker_is_an_error():
    with pytest.raises(ValueError, match="START"):
        clean_book(b"just some text")


def test_html_character_references_are_decoded(make_gutenberg_text):
    raw = make_gutenberg_text("Helena", ["Ele disse &quot;sim&quot;, n&atilde;o &#233; &#x41;, &lt;nada&gt; &amp; "
                                         "tudo&nbsp;mais &mdash; e foi-se embora para a cidade, meu caro amigo."])
    (para,) = clean_book(raw, min_paragraph_chars=0)[1]
    assert para.replace("\n", " ") == "Ele disse «sim», não é A, <nada> & tudo mais — e foi-se embora para a cidade, meu caro amigo."


def test_a_bare_ampersand_and_unterminated_names_are_kept():
    # html.unescape alone would read "&notas" as "¬as" (an HTML5 legacy name without ";")
    assert paragraphs("Garnier &notas & C. editores, Rio de Janeiro e Paris, 1899.", 0) == \
        ["Garnier &notas & C. editores, Rio de Janeiro e Paris, 1899."]


def test_binary_between_the_markers_is_not_a_book():
    import random

    raw = (b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + random.Random(1).randbytes(20_000)
           + b"\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n")
    with pytest.raises(NotABook, match=r"control characters .*binary data"):
        clean_book(raw)


def test_a_book_needs_min_book_chars_of_clean_text(make_gutenberg_text):
    raw = make_gutenberg_text("Helena", [PROSE, OTHER])
    assert clean_book(raw, min_book_chars=len(PROSE) + len(OTHER))[1] == [PROSE, OTHER]
    with pytest.raises(NotABook, match=rf"only {len(PROSE) + len(OTHER)} characters"):
        clean_book(raw, min_book_chars=len(PROSE) + len(OTHER) + 1)


def test_title_comes_from_the_title_line():
    assert title_of(decode_text("\ufeffTitle: Yayá Garcia\r\n\r\nAuthor: X".encode())) == "Yayá Garcia"


def test_footnote_blocks_and_markers_are_removed():
    note = "[Footnote 8: Veja nota [1].\n\nA nota continua\nem duas linhas.]"
    assert paragraphs(body(PROSE.replace("cidade", "cidade[1]"), note, OTHER), 0) == [PROSE, OTHER]


def test_other_bracketed_apparatus_is_removed():
    assert paragraphs(body("[Ilustração]", PROSE + " [added part of sentence]", "[signature]"), 0) == [PROSE]


def test_unicode_is_nfc():
    decomposed = "Ca\u0303o e corac\u0327a\u0303o."
    assert paragraphs(decomposed, 0) == ["Cão e coração."]


def test_hard_wrapped_prose_is_joined_into_one_paragraph():
    assert paragraphs(body(textwrap.fill(PROSE, 70), textwrap.fill(OTHER, 64)), 0) == [PROSE, OTHER]


def test_verse_keeps_its_line_breaks():
    stanza = "Querida, ao pé do leito derradeiro\nEm que descanças dessa longa vida,\nAqui venho e virei."
    prose = "\n\n".join(textwrap.fill(PROSE * 3, 72) for _ in range(5))
    assert paragraphs(body(prose, "  " + stanza.replace("\n", "\n  ")), 0)[-1] == stanza


def test_min_paragraph_chars_drops_short_paragraphs():
    blocks = body("CAPITULO I", PROSE, "FIM")
    assert paragraphs(blocks, 50) == [PROSE]
    assert paragraphs(blocks, 0) == ["CAPITULO I", PROSE, "FIM"]


def test_punctuation_policy():
    text = ('--Sim, disse elle... "Vou" e “volto”; é _muito_ **bom**… frei *** d’elle;'
            "\n\nI.----A carta")
    assert paragraphs(text, 0) == ["—Sim, disse elle... «Vou» e «volto»; é muito bom... frei *** d'elle;",
                                   "I.—A carta"]


def test_line_final_dash_joins_without_space():
    assert paragraphs(f"{PROSE},--\nmas não disse nada.", 0) == [f"{PROSE},—mas não disse nada."]


def test_end_of_book_line_and_transcriber_notes_are_dropped():
    tail = ("End of the Project Gutenberg EBook of Helena, by\nMachado de Assis",
            "Notas", "Os erros óbvios do editora foram corrigidos.", "O Indice foi realocado ao inicio.")
    assert paragraphs(body(PROSE, *tail), 0) == [PROSE]


def test_table_of_contents_is_dropped():
    toc = body("INDICE", "    Capitulo I    Do titulo\n             II   Do livro", "ADVERTENCIA.     I")
    assert paragraphs(body(toc, "I", PROSE, OTHER), 0) == [PROSE, OTHER]


def test_real_books_lose_all_gutenberg_apparatus(shared_gutenberg):
    for path in sorted(shared_gutenberg.glob("*.txt")):
        title, paras = clean_book(path.read_bytes(), 50)
        text = book_text(paras)
        assert title and len(paras) > 500, path.name
        for junk in ("Gutenberg", "GUTENBERG", "Produced by", "[Illustration", "[Footnote", "[1]", "\r", "\ufeff",
                     "_", "--"):
            assert junk not in text, (path.name, junk)
