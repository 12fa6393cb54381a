"""Books: upload a .txt (any encoding), .fb2 or .epub, list them, read one's first lines, delete.
The web API only ever reads uploaded books, never a path on the server."""

import os
import re
from pathlib import Path

from fastapi import APIRouter, File, Form, UploadFile

from app import runs
from app.web.common import Answer, Azr, Damaged
from app.web.errors import TooLarge, too_big
from app.names import check_name

router = APIRouter(tags=["books"])


class BookInfo(Answer):
    name: str
    sha256: str
    characters: int
    encoding: str
    language: str


@router.post("/upload_book", status_code=201, summary="Upload a .txt (any encoding), .fb2 or .epub book")
def upload_book(azr: Azr, file: UploadFile = File(...), name: str | None = Form(None)):
    data = read_upload(file, azr.max_upload_bytes)
    name = check_name(name or book_name_from(file.filename), "book")
    info = azr.store.books.add(name, data, file.filename or "book.txt", max_bytes=azr.max_upload_bytes)
    return {**info, "preview": preview(azr.store.books.text(name))}


@router.get("/books", summary="Uploaded books with size, encoding and language (a book whose info cannot be read: "
                              "{name, damaged})", response_model=list[BookInfo | Damaged])
def list_books(azr: Azr):
    return [{**b, "first_line": first_line_of(azr.store, b["name"])} for b in azr.store.books.list()]


@router.get("/books/{name}", summary="One book's info and the first lines of its text")
def book_info(name: str, azr: Azr):
    return {**azr.store.books.info(name), "preview": preview(azr.store.books.text(name))}


@router.delete("/books/{name}", summary="Delete a book")
def delete_book(name: str, azr: Azr):
    azr.store.books.delete(name)
    return {"deleted": name}


def read_upload(file, max_upload_bytes):
    """The uploaded bytes, refusing more than the limit (Content-Length may be missing or lie)."""
    chunks, total = [], 0
    while chunk := file.file.read(2**20):
        total += len(chunk)
        if total > max_upload_bytes:
            raise TooLarge(too_big("/upload_book", max_upload_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


def book_name_from(filename):
    stem = Path(os.path.basename(filename or "book")).stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64].strip("_") or "book"


def first_line_of(store, name, chars=4096):
    """A book's first line, the page's default prompt for a model trained on it (as the samples'
    while training, runs.first_line); only the start of the book is read."""
    try:
        with store.books.path(name).open(encoding="utf-8") as f:
            return runs.first_line(f.read(chars))
    except (OSError, ValueError):  # deleted meanwhile, or not UTF-8 yet (dropped in by hand): no default
        return None


def preview(text, lines=12, chars=1200):
    return "\n".join(text[:chars].splitlines()[:lines])
