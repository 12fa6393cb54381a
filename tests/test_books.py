"""Reading books in any encoding and format: what comes out, and a clear error for what cannot."""

import io
import os
import zipfile

import pytest

from app import books
from app.books import BookError, guess_language, read_book
from test_tokenizer import EN, PL, RU


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
    monkeypatch.setattr(books, "_guess_encoding", lambda data: "utf-16-be")
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
