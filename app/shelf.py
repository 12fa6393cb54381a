"""The store's books: each one kept as clean UTF-8 text beside a record of how it was read.

    <home>/books/<book>.txt     the text, whatever encoding and format it came in (books.py reads it)
    <home>/books/<book>.json    its record: file name, sizes, encoding, language, sha256 of the text

A run names its books, and the lineage of a model keeps each book's sha256, so the record is
written last: a book without one is a .txt dropped in by hand, read like an upload the first time
it is asked for. Every change to a book happens under the book's own lock, as a model's does
(store.py): of two uploads under one name one is stored and the other is told the name is taken.
"""

import hashlib
import os
import re
from pathlib import Path

from files import CorruptFile, Exists, NotFound, StoreError, atomic_write, held, write_json

from app import records
from app.books import MAX_UNZIPPED_BYTES, BookError, read_book
from app.names import NAME_RE, check_name


class Shelf:
    def __init__(self, home):
        self.home = home

    def locked(self, name):
        return held(self.home / "locks" / f"book-{check_name(name, 'book')}.lock",
                    f"book {name!r} is busy: another process has been changing it for minutes; try again")

    def path(self, name):
        return self.home / "books" / f"{check_name(name, 'book')}.txt"

    def add(self, name, data, filename="book.txt", max_bytes=MAX_UNZIPPED_BYTES):
        """Read raw bytes (any encoding/format), store the clean UTF-8 text; returns its info.
        Of two uploads under one name, one is stored, the other gets Exists. `max_bytes` caps
        what an .epub may inflate to (books.read_book)."""
        path = self.path(name)
        book = read_book(data, filename, max_bytes)  # the slow part, outside the lock
        with self.locked(name):
            if path.exists():
                raise Exists(f"a book named {name!r} already exists; delete it first or pick another name")
            return self._save(path, book, len(data), filename)

    def info(self, name):
        path = self.path(name)
        with self.locked(name):
            if not path.is_file():
                raise NotFound(f"no book named {name!r}; upload it first (known: {[b['name'] for b in self.list()]})")
            meta = path.with_suffix(".json")
            if not meta.exists():
                return self._describe_loose(path)
            try:
                return records.load(meta, records.BookMeta)
            except CorruptFile as e:
                raise CorruptFile(f"{e}; remove that file to have the book's text read again, or delete the book "
                                  f"(Delete on the Books tab)") from None

    def _describe_loose(self, path):
        """A .txt dropped into books/ by hand: read it like an upload, once."""
        data = path.read_bytes()
        return self._save(path, read_book(data, path.name), len(data), path.name)

    def _save(self, path, book, n_bytes, filename):
        """The book's clean UTF-8 text at `path` and its info next to it (written last)."""
        text = book.text.encode("utf-8")
        info = {"name": path.stem, "filename": os.path.basename(filename), "bytes": n_bytes, "text_bytes": len(text),
                "sha256": hashlib.sha256(text).hexdigest(), **book.report(), "added": records.now()}
        if not path.exists() or path.read_bytes() != text:
            atomic_write(path, text)
        write_json(path.with_suffix(".json"), info)
        return info

    def text(self, name):
        return self.read(name)[1]

    def read(self, name):
        """(info, text) of a stored book, read together: the text is the one its sha256 names."""
        with self.locked(name):
            info = self.info(name)
            return info, self.path(name).read_text(encoding="utf-8")

    def list(self):
        """Every book's info; a book whose info is damaged is listed as {name, damaged: what to do}."""
        out = []
        for p in sorted((self.home / "books").glob("*.txt")):
            if not (NAME_RE.fullmatch(p.stem) and p.is_file()):
                continue  # a folder named like a book is not one
            try:
                out.append(self.info(p.stem))
            except NotFound:
                continue  # deleted while we listed
            except BookError:
                continue  # an unreadable file dropped in by hand is not a book
            except (StoreError, OSError) as e:
                out.append({"name": p.stem, "damaged": str(e)})
        return out

    def delete(self, name):
        """Delete a book's text and info; also of a book whose info is damaged."""
        path = self.path(name)
        with self.locked(name):
            if not path.is_file():
                raise NotFound(f"no book named {name!r}")
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)

    def resolve(self, ref, allow_path=False):
        """A book given as a store name -> (name, text, sha256). Only the CLI passes allow_path,
        to name a file by its path; a name from the web API never becomes a path on the server."""
        if not self._is_path(ref, allow_path):
            info, text = self.read(check_name(ref, "book"))
            return ref, text, info["sha256"]
        p = Path(ref)
        if not p.is_file():
            raise NotFound(f"no book {ref!r}: not an uploaded book name and not a file")
        text = read_book(p.read_bytes(), p.name).text
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", p.stem)[:64] or "book"
        return stem, text, hashlib.sha256(text.encode()).hexdigest()

    def sha256(self, ref, allow_path=False):
        """The sha256 of a book's text as it is now (a path is read again)."""
        if not self._is_path(ref, allow_path):
            return self.info(check_name(ref, "book"))["sha256"]
        return self.resolve(ref, allow_path)[2]

    def _is_path(self, ref, allow_path):
        """Only where allowed (the CLI) is a book named by a path, and a stored book's name wins."""
        return allow_path and not (NAME_RE.fullmatch(ref) and self.path(ref).exists())
