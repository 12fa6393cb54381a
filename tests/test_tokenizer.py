"""Reading books in any encoding and format, byte-level BPE round trips, token arrays."""

import io
import os
import zipfile

import numpy as np
import pytest

import tokenizer
from tokenizer import BookError, Tokenizer, guess_language, prepare_tokens, read_book

EN = "The keeper climbed the stairs at dusk and lit the lamp, as she had done for eleven winters.\n"
RU = "Смотритель маяка поднялся по лестнице в сумерках и зажёг лампу, как делал это одиннадцать зим подряд.\n"
PL = "Latarniczka weszła po schodach o zmierzchu i zapaliła lampę, jak co wieczór przez jedenaście zim. Żółć!\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([EN * 30, RU * 30, PL * 30], vocab_size=400)


@pytest.mark.parametrize("text", [EN, RU, PL, "mixed: ёж, żółw, 😀, tabs\tand\r\nCRLF  spaces   "])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes_of(ids) == text.encode("utf-8")


def test_vocab_has_bytes_merges_and_the_special_token(tok):
    assert tok.vocab_size == 400 and tok.eot_id == 0
    assert len(tok.encode(EN)) < len(EN.encode()) / 2  # merges compress the text it was trained on
    assert tok.byte_lengths().sum() > 256


def test_tokenizer_survives_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(RU) == tok.encode(RU) and again.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("encoding", ["cp1251", "koi8-r", "utf-16-le", "utf-16-be", "utf-16", "utf-8-sig"])
def test_russian_book_in_any_encoding_is_detected(encoding):
    book = read_book((RU * 20).encode(encoding))
    assert book.text == RU * 20
    assert book.language == "ru"


def test_cp1251_is_reported_as_such():
    assert read_book((RU * 20).encode("cp1251")).encoding == "cp1251"


def test_latin1_french_decodes():
    text = "Le garçon était très âgé; la crème brûlée coûtait cher à Noël.\n" * 10
    assert read_book(text.encode("latin-1")).text == text


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (os.urandom(4000), "binary"),
    (b"\x89PNG\r\n\x1a\n" + os.urandom(2000), "binary"),
    (b"\x00" * 500, "binary"),
    (b"   \n\n  ", "no text"),
])
def test_bad_input_gets_a_clear_error(data, message):
    with pytest.raises(BookError, match=message):
        read_book(data)


def test_utf8_with_three_stray_bytes_is_utf8_with_three_replacement_characters():
    lines = (RU * 40).encode().splitlines(keepends=True)
    data = b"".join(line + (b"\xff" if i in (3, 17, 30) else b"") for i, line in enumerate(lines))
    book = read_book(data)
    assert book.encoding == "utf-8" and book.replaced == 3 and book.text.count("\ufffd") == 3
    assert book.text.replace("\ufffd", "") == RU * 40 and "U+FFFD): 3" in " ".join(book.notes)


def test_utf8_with_two_cut_characters_keeps_every_other_letter():
    data = (PL * 40).encode()
    for cut in (1000, 3000):  # drop the second byte of the two-byte letter after `cut`
        at = next(i for i in range(cut, len(data)) if data[i] >= 0xC2)
        data = data[:at + 1] + data[at + 2:]
    book = read_book(data)
    assert book.encoding == "utf-8" and book.replaced == 2 and book.language == "pl"
    assert len(book.text) == len(PL * 40) and book.text.count("\ufffd") == 2


def test_a_cp1251_chapter_in_a_utf8_book_is_read_in_both():
    book = read_book((RU * 20).encode("cp1251") + (RU * 200).encode())
    assert book.encoding == "utf-8+cp1251" and book.replaced == 0 and book.text == RU * 220


JA = "灯台守は夕暮れに階段を上り、ランプに火をともした。\n十一回目の冬も、船は一隻も岩に乗り上げなかった。\n"


def test_shift_jis_with_one_bad_byte_is_shift_jis_with_one_replacement():
    data = (JA * 40).encode("shift_jis")
    at = data.index(b"\n", 1000) + 1  # a byte no Shift-JIS character starts with, between two lines
    book = read_book(data[:at] + b"\xff" + data[at:])
    assert book.encoding in ("cp932", "shift_jis", "shift_jis_2004") and book.replaced == 1
    assert book.text.replace("\ufffd", "") == JA * 40


def test_a_guess_that_gives_characters_no_book_uses_is_refused(monkeypatch):
    """Shift-JIS read as UTF-16-BE: lead bytes 0xE0..0xEF pair up into private-use code points."""
    monkeypatch.setattr(tokenizer, "_guess_encoding", lambda data: "utf-16-be")
    with pytest.raises(BookError, match="private-use or unassigned"):
        read_book((JA * 40).encode("shift_jis"))


def test_windows_newlines_and_gutenberg_boilerplate_are_cleaned():
    raw = ("Licence blah\r\n*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\r\n" + EN * 3
           + "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\r\nMore licence\r\n")
    book = read_book(raw.encode())
    assert book.text == EN * 3
    assert any("Gutenberg" in n for n in book.notes) and any("newlines" in n for n in book.notes)


def test_fb2_book_text_is_extracted():
    fb2 = ('<?xml version="1.0" encoding="windows-1251"?><FictionBook><body><section>'
           f"<p>{RU.strip()}</p><p>Вторая строка.</p></section></body></FictionBook>").encode("cp1251")
    book = read_book(fb2, "book.fb2")
    assert book.format == "fb2" and RU.strip() in book.text and "Вторая строка." in book.text
    assert "<p>" not in book.text


def _epub(chapters, extra=None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mimetype", "application/epub+zip")
        items = "".join(f'<item id="c{i}" href="c{i}.xhtml"/>' for i in range(len(chapters)))
        spine = "".join(f'<itemref idref="c{i}"/>' for i in reversed(range(len(chapters))))
        z.writestr("OEBPS/content.opf", f"<package><manifest>{items}</manifest><spine>{spine}</spine></package>")
        for i, ch in enumerate(chapters):
            z.writestr(f"OEBPS/c{i}.xhtml", f"<html><head><style>p{{}}</style></head><body><p>{ch}</p></body></html>")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_epub_chapters_come_in_spine_order():
    book = read_book(_epub(["First chapter text here.", "Second chapter text here."]), "b.epub")
    assert book.format == "epub"
    assert book.text.index("Second") < book.text.index("First")  # the spine lists them reversed
    assert "p{}" not in book.text


def test_epub_zip_bomb_is_refused():
    bomb = _epub(["Some text of the chapter."], extra={"OEBPS/bomb.xhtml": "a" * (300 * 2**20)})
    assert len(bomb) < 2 * 2**20
    with pytest.raises(BookError, match="zip bomb"):
        read_book(bomb, "bomb.epub")


def test_language_guess():
    assert [guess_language(t * 5) for t in (EN, RU, PL)] == ["en", "ru", "pl"]


def test_token_arrays_split_contiguous_chunks_and_are_cached(tok, tmp_path):
    books = {"en": EN * 200, "pl": PL * 200}
    data = prepare_tokens(tok, books, tmp_path)
    n_train, n_val = len(data["train"]), len(data["val"])
    assert isinstance(data["train"], np.memmap) and data["train"].dtype == np.uint16
    assert 0.07 < n_val / (n_train + n_val) < 0.13
    all_ids = tok.encode(("\n<|endoftext|>\n").join([EN * 200, PL * 200]))
    assert n_train + n_val == len(all_ids)
    mtime = (next(tmp_path.iterdir()) / "train.bin").stat().st_mtime_ns
    prepare_tokens(tok, books, tmp_path)  # the same books again: read from the cache, not re-encoded
    assert (next(tmp_path.iterdir()) / "train.bin").stat().st_mtime_ns == mtime


def test_too_short_book_is_refused(tok, tmp_path):
    with pytest.raises(BookError, match="longer text"):
        prepare_tokens(tok, {"tiny": "Hi there."}, tmp_path)


def test_ids_past_the_vocabulary_spell_nothing():
    tok = Tokenizer.train(["a small book, " * 50], 5000)  # far fewer merges than 5000
    assert tok.vocab_size < 5000
    assert tok.token_bytes(4999) == b"" and tok.decode(tok.encode("a small") + [4999]) == "a small"
