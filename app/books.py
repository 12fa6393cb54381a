"""Reading a book file: any encoding, any of three formats, cleaned to the text a model should learn.

A book arrives as bytes in some encoding (UTF-8, UTF-16, cp1251, koi8-r, ...) and some format
(.txt, .fb2, .epub). We detect the encoding with charset-normalizer, pull the text out of the
XML and zip formats, normalise newlines, strip Project Gutenberg's licence header and footer,
guess the language, and report each thing we did (BookText.report), so the user sees what
became of their file. Anything we cannot read is a BookError that says why and what to do.

An upload is untrusted: an .epub is a zip, and a zip may claim to inflate to far more than it
holds, so every member is inflated against a budget (MAX_UNZIPPED_BYTES, MAX_ZIP_RATIO,
MAX_ZIP_MEMBERS) and refused when it passes it.
"""

import html
import io
import os
import re
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from charset_normalizer import from_bytes

MAX_UNZIPPED_BYTES = 200 * 2**20  # the chapters of an .epub may not inflate past this (zip-bomb guard)
MAX_ZIP_RATIO = 100  # nor any member more than 100x
MAX_ZIP_MEMBERS = 5000  # a book has hundreds of files, not millions of empty ones


class BookError(ValueError):
    """A book we cannot read; the message says why and what to do."""


# ----------------------------------------------------------------------------- reading books


@dataclass
class BookText:
    text: str
    encoding: str
    format: str
    language: str
    notes: list = field(default_factory=list)  # what was done to the raw bytes, for the user
    replaced: int = 0  # bytes that fit no encoding and became U+FFFD

    def report(self):
        return {"encoding": self.encoding, "format": self.format, "language": self.language,
                "characters": len(self.text), "replaced": self.replaced, "notes": self.notes}


def read_book(data, filename="book.txt", max_bytes=MAX_UNZIPPED_BYTES):
    """bytes of a .txt/.fb2/.epub file -> BookText, or BookError with a clear message.

    `max_bytes` caps what an .epub may inflate to (the server passes its upload limit: a zip
    must not smuggle in more than a plain upload may hold). A .txt or .fb2 is its own bytes."""
    if not data:
        raise BookError("the file is empty")
    ext = Path(filename).suffix.lower()
    notes, replaced = [], 0
    if ext == ".epub" or data[:4] == b"PK\x03\x04":
        raw, fmt = _epub_text(data, max_bytes), "epub"
        text, encoding = raw, "utf-8"
        notes.append("extracted text from the EPUB's XHTML chapters")
    else:
        text, encoding, replaced = decode_bytes(data)
        if replaced:
            notes.append(f"bytes that are not {encoding}, each now \ufffd (U+FFFD): {replaced:,}")
        fmt = "txt"
        if ext == ".fb2" or text.lstrip().startswith("<?xml") and "<FictionBook" in text[:2000]:
            text, fmt = _markup_text(text), "fb2"
            notes.append("extracted text from the FB2 (FictionBook) XML")
    notes.insert(0, f"decoded as {encoding}")
    text, more = clean_text(text)
    notes += more
    if len(text.strip()) < 20:
        raise BookError("the file holds almost no text after cleaning (under 20 characters)")
    return BookText(text, encoding, fmt, guess_language(text), notes, replaced)


def decode_bytes(data):
    """bytes -> (str, encoding name, bytes replaced by U+FFFD). Rejects binary files, and guesses
    that give text no book holds.

    A UTF-8 book with a few stray bytes (a cut character, a 0xFF from a bad copy) stays UTF-8:
    up to MAX_STRAY_SHARE of its bytes become U+FFFD, and the answer says how many. A UTF-8 file
    with a longer stretch in an old code page (a cp1251 chapter pasted into a UTF-8 book) is
    read as both: UTF-8 where it is valid, the rest in the code page its stray bytes look like."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig", 0
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):  # checked first: it starts like UTF-16's
        return data.decode("utf-32", errors="replace"), "utf-32", 0
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace"), "utf-16", 0  # an odd last byte becomes U+FFFD
    # most books are UTF-8: decoding is exact and instant; each byte that is not part of a valid
    # UTF-8 character becomes a lone surrogate U+DC80..U+DCFF, so the strays can be counted
    text = data.decode("utf-8", errors="surrogateescape")
    stray = len(_STRAY_BYTE.findall(text))
    if not stray and _mostly_printable(text):
        return text, "utf-8", 0
    if stray and len(_STRAY.findall(text)) <= UTF8_EVIDENCE * _utf8_words(text) and _mostly_printable(text):
        if stray <= MAX_STRAY_SHARE * len(data):
            return _STRAY_BYTE.sub("\ufffd", text), "utf-8", stray
        return _utf8_and_code_page(text)
    if data[:8192].count(b"\x00") > 8:  # NULs: UTF-16 without a BOM, or binary
        texts = {enc: data.decode(enc, errors="replace") for enc in ("utf-16-le", "utf-16-be")}
        # the wrong byte order turns letters into CJK-range code points: keep the one whose
        # characters sit mostly in the alphabetic blocks below U+0530 (Latin, Greek, Cyrillic)
        share = {e: sum(ord(ch) < 0x530 for ch in t[:10_000]) / max(1, len(t[:10_000])) for e, t in texts.items()}
        enc = max(share, key=share.get)
        if share[enc] > 0.6 and _mostly_printable(texts[enc]):  # random bytes land all over Unicode
            return texts[enc], enc, 0
        raise BookError("this looks like a binary file, not text; upload a .txt, .fb2 or .epub book")
    encoding = _guess_encoding(data[:2_000_000])
    text = data.decode(encoding, errors="replace")
    _check_likely(text, encoding)
    # a byte the code page leaves undefined becomes U+FFFD, or a private-use character (cp932 reads
    # a stray 0xFF as U+F8F3): both are bytes that mean nothing here
    text, replaced = _MEANS_NOTHING.subn("\ufffd", text)
    if replaced > MAX_STRAY_SHARE * len(data):
        raise BookError(f"this file is not in one encoding: read as {encoding}, the best guess, {replaced:,} of its "
                        f"bytes mean nothing; save it as UTF-8 and upload it again")
    return text, encoding, replaced


MAX_STRAY_SHARE = 0.001  # a book that is 99.9 % valid UTF-8 is UTF-8, the rest U+FFFD
MAX_ODD_SHARE = 0.01  # private-use or unassigned characters: a wrong guess, not a book
# A file is UTF-8 with strays when it has at least a tenth as many words spelt with valid
# multi-byte UTF-8 letters as runs of stray bytes: text in an old code page (cp1251, Shift-JIS,
# GBK) forms a valid UTF-8 letter only by chance, and almost never three in a word
UTF8_EVIDENCE = 10
_STRAY = re.compile("[\udc80-\udcff]+")  # bytes that were not UTF-8 (surrogateescape), a run at a time
_STRAY_BYTE = re.compile("[\udc80-\udcff]")
_MEANS_NOTHING = re.compile("[\ue000-\uf8ff\ufffd]")  # private use, or a decoder's replacement
_UTF8_WORD = re.compile(r"[^\W\d_]*[^\x00-\x7f\W\d_][^\W\d_]*")  # letters, one of them not ASCII


def _utf8_words(text):
    return sum(1 for w in _UTF8_WORD.findall(text) if len(w) >= 3)


def _utf8_and_code_page(text):
    """A UTF-8 text (surrogateescape) with many stray bytes: decode the strays in the code page
    their runs look like, joined by spaces as the words they were."""
    runs = [bytes(ord(ch) - 0xDC00 for ch in run) for run in _STRAY.findall(text)]
    encoding = _guess_encoding(b" ".join(runs))
    text = _STRAY.sub(lambda m: bytes(ord(ch) - 0xDC00 for ch in m.group()).decode(encoding, errors="replace"), text)
    _check_likely(text, f"utf-8+{encoding}")
    return text, f"utf-8+{encoding}", text.count("\ufffd")


def _guess_encoding(data):
    """charset-normalizer's pick. It only offers encodings that decode every byte, so one bad
    byte rules them all out: then the pick that most pieces of the file (cut at newlines) agree on."""
    matches = list(from_bytes(data))
    if matches:
        return _pick_encoding(matches)
    votes = Counter(_pick_encoding(m) for piece in _pieces(data) if (m := list(from_bytes(piece))))
    if not votes:
        raise BookError("could not detect a text encoding; this does not look like a book (binary file?)")
    return votes.most_common(1)[0][0]


def _pieces(data, n=8):
    """`data` cut into about n pieces, each cut after a newline (never inside a character)."""
    cuts = [0]
    for k in range(1, n):
        at = data.find(b"\n", k * len(data) // n)
        if at >= cuts[-1]:
            cuts.append(at + 1)
    return [data[a:b] for a, b in zip(cuts, cuts[1:] + [len(data)]) if b > a]


def _check_likely(text, encoding):
    """Refuse a decoding that is mostly control characters (binary) or gives characters no book
    uses: private-use and unassigned code points are what a wrong multi-byte guess (UTF-16 read
    from Shift-JIS, say) produces."""
    if not _mostly_printable(text):
        raise BookError("the file is mostly control characters; it looks binary, not text")
    sample = text[:100_000]
    odd = sum(1 for ch in sample if unicodedata.category(ch) in ("Co", "Cn", "Cs"))
    if odd > MAX_ODD_SHARE * len(sample):
        raise BookError(f"read as {encoding}, the best guess, {odd / len(sample):.0%} of the characters are ones no "
                        f"book uses (private-use or unassigned): the encoding is not one we can tell; "
                        f"save it as UTF-8 and upload it again")


# Single-byte code pages are often indistinguishable on a short text (cp1250 and cp1252 agree on
# most accented letters): among equally good guesses, take the most common encoding.
_PREFERRED = ["utf_8", "cp1252", "latin_1", "cp1251", "koi8_r", "cp1250", "iso8859_2", "iso8859_5"]


def _pick_encoding(matches):
    best = matches[0]
    ties = [m.encoding for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
    return min(ties, key=lambda e: _PREFERRED.index(e) if e in _PREFERRED else len(_PREFERRED))


def _mostly_printable(text):
    sample = text[:100_000]
    ctrl = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\n\r\t\f")
    return ctrl <= 0.01 * len(sample)


class _TextOf(HTMLParser):
    """Collect the text of an XHTML/FB2 document, a blank line after each block element."""

    BLOCKS = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "title", "section", "v", "stanza"}
    SKIP = {"script", "style", "binary", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag != "v" else "\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _markup_text(markup):
    p = _TextOf()
    p.feed(markup)
    text = "".join(p.parts)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", html.unescape(text)).strip() + "\n"


def _epub_text(data, max_bytes):
    """The chapters of an EPUB (a zip of XHTML files), in reading order, with bomb guards: the
    sizes in the zip's directory are checked before anything is inflated, and then each file is
    inflated a piece at a time, counting what really comes out (_Inflater): the sizes are only
    the sender's word."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except zipfile.BadZipFile:
        raise BookError("this .epub is not a valid zip archive")
    if len(infos) > MAX_ZIP_MEMBERS:
        raise BookError(f"this .epub holds {len(infos):,} files, more than the {MAX_ZIP_MEMBERS:,} a book may have")
    if any(i.file_size > MAX_ZIP_RATIO * max(i.compress_size, 1) + 2**20 for i in infos):
        raise BookError("this .epub inflates to an implausible size (zip bomb?); refusing to open it")
    read = [i for i in infos if i.filename.lower().endswith((".xhtml", ".html", ".htm", ".opf"))]
    total = sum(i.file_size for i in read)
    if total > max_bytes:
        raise BookError(f"this .epub's chapters inflate to {total / 2**20:.1f} MB, more than the "
                        f"{max_bytes / 2**20:.0f} MB a book may hold (the upload limit)")
    if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in read):
        raise BookError("this .epub compresses its chapters with something other than deflate, "
                        "which the EPUB format does not allow; save it again with an EPUB editor")
    names = [i.filename for i in read if not i.filename.lower().endswith(".opf")]
    inflate = _Inflater(z, max_bytes)
    try:  # a member can still be encrypted, damaged or lie about its size: we find out on read
        names = _spine_order(z, names, inflate)
        if not names:
            raise BookError("this .epub holds no XHTML chapters")
        chapters = [_markup_text(inflate(n).decode("utf-8", errors="replace")) for n in names]
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as e:
        raise BookError(f"this .epub cannot be read (damaged, encrypted or compressed oddly): {e}") from e
    return "\n\n".join(c for c in chapters if c.strip())


class _Inflater:
    """Inflate members of a zip, all together at most `max_bytes`, whatever their headers say.

    zipfile's read() of a whole member inflates each compressed chunk in one call, so a chapter
    whose header claims 2 KB but whose megabyte of deflate data inflates to a gigabyte costs a
    gigabyte before anything is checked. Reading INFLATE_PIECE bytes at a time bounds every call;
    counting the pieces stops at the cap."""

    INFLATE_PIECE = 2**16

    def __init__(self, z, max_bytes):
        self.z, self.max_bytes, self.used = z, max_bytes, 0

    def __call__(self, name):
        pieces = []
        with self.z.open(name) as f:
            while piece := f.read(self.INFLATE_PIECE):
                self.used += len(piece)
                if self.used > self.max_bytes:
                    raise BookError(f"this .epub's chapters inflate to more than the {self.max_bytes / 2**20:.0f} MB "
                                    f"a book may hold (the upload limit), more than its headers say (zip bomb?)")
                pieces.append(piece)
        return b"".join(pieces)


def _spine_order(z, names, inflate):
    """Order chapters by the OPF spine when it can be read; else by file name."""
    opf = next((n for n in z.namelist() if n.lower().endswith(".opf")), None)
    if opf is None:
        return sorted(names)
    src = inflate(opf).decode("utf-8", errors="replace")
    hrefs = dict(re.findall(r'<item[^>]*?id="([^"]+)"[^>]*?href="([^"]+)"', src))
    base = os.path.dirname(opf)
    order = [os.path.normpath(os.path.join(base, hrefs[i])) for i in re.findall(r'<itemref[^>]*?idref="([^"]+)"', src) if i in hrefs]
    ordered = [n for n in order if n in names]
    return ordered + sorted(set(names) - set(ordered))


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def clean_text(text):
    """Normalise newlines and strip a Project Gutenberg header/footer. -> (text, notes)."""
    notes = []
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        notes.append("normalised Windows/Mac newlines to \\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start and end and start.end() < end.start():
        text = text[start.end():end.start()].strip("\n") + "\n"
        notes.append("removed the Project Gutenberg header and footer")
    return text, notes


def guess_language(text):
    """A cheap guess from the letters used: good enough to label a book, not a classifier."""
    sample = text[:200_000].lower()
    letters = [ch for ch in sample if ch.isalpha()]
    if not letters:
        return "unknown"
    cyr = sum("\u0400" <= ch <= "\u04ff" for ch in letters) / len(letters)
    if cyr > 0.5:
        return "uk" if sum(sample.count(c) for c in "іїє") > 0.002 * len(letters) else "ru"
    if sum(sample.count(c) for c in "ąęłśżźćń") > 0.005 * len(letters):
        return "pl"
    words = re.findall(r"[a-zäöüßéèàç]+", sample)
    votes = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(votes, key=votes.get)
    return best if votes[best] > 0.02 * max(len(words), 1) else "unknown"


# the names of the languages guess_language can answer, for people (the page shows "Polish (pl)")
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "pl": "Polish",
                  "ru": "Russian", "uk": "Ukrainian", "unknown": "unknown"}

_STOPWORDS = {
    "en": {"the", "and", "of", "to", "is", "was", "that", "in", "it", "he", "she"},
    "de": {"der", "die", "und", "das", "ist", "nicht", "ich", "sie", "ein"},
    "fr": {"le", "la", "les", "et", "est", "une", "que", "pas", "des"},
    "es": {"el", "la", "los", "que", "y", "es", "una", "por", "con"},
}
