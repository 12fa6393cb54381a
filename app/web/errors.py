"""Every error leaves as JSON {"error": "...", "field": "..."} (the schema's ErrorBody) with a
status that says whose fault it was: 4xx for what a user can cause, 500 for a bug or a damaged
file, and the server keeps running. No message shows where the data folder is, and none is
longer than MAX_ERROR_CHARS. A settings value we cannot use (config.SettingError) names its
field, so the page can mark it."""

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.web.common import MAX_ERROR_CHARS, MAX_JSON_BYTES
from app.web.generation_queue import Abandoned
from config import SettingError
from files import CorruptFile, Exists, InUse, NotFound, hide_paths
from app.jobs import Busy

log = logging.getLogger("azr.server")


class TooLarge(ValueError):
    pass


def add_error_handlers(app, azr):
    """Every error leaves as {"error": message} with a status that says whose fault it was; the
    message names files relative to the data folder and is cut at MAX_ERROR_CHARS."""
    max_upload_bytes = azr.max_upload_bytes

    def said(message):
        return hide_paths(message, azr.store.home)[:MAX_ERROR_CHARS]

    @app.exception_handler(RequestValidationError)
    async def bad_request_shape(request, exc):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))[:100]
        body = {"error": said(f"{field}: {first['msg']}" if field else first["msg"])}
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = too_big(request.url.path, max_upload_bytes) if exc.status_code == 413 else said(str(exc.detail))
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    async def known_error(request, exc):
        body = {"error": said(str(exc))}
        if isinstance(exc, SettingError):
            body["field"] = exc.field
        return JSONResponse(body, status_code=error_status(exc))

    async def unexpected_error(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": said(f"internal error ({type(exc).__name__}): {exc}")}, status_code=500)

    # ValueError covers StoreError, BookError and every settings check
    for cls in (ValueError, Busy, Abandoned):
        app.add_exception_handler(cls, known_error)
    app.add_exception_handler(Exception, unexpected_error)
    refuse_big_bodies(app, max_upload_bytes)


def refuse_big_bodies(app, max_upload_bytes):
    """Refuse an oversized body from its Content-Length, before reading it."""

    @app.middleware("http")
    async def check_length(request, call_next):
        length, path = request.headers.get("content-length", ""), request.url.path
        limit = max_upload_bytes + 2**16 if path == "/upload_book" else MAX_JSON_BYTES
        if length.isdigit() and int(length) > limit:
            return JSONResponse({"error": too_big(path, max_upload_bytes)}, status_code=413)
        return await call_next(request)


def error_status(exc):
    """Whose fault: 404/409/413/400 for the user's, 500 for a damaged file on our disk."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Exists, Busy, InUse)):
        return 409
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, CorruptFile):
        return 500
    if isinstance(exc, Abandoned):
        return 499  # "client closed request" (nginx's code): nobody reads it
    return 400


def too_big(path, max_upload_bytes):
    if path != "/upload_book":
        return f"the request body is larger than the {MAX_JSON_BYTES // 1024:,} KB a request may send"
    return f"the file is larger than the upload limit of {max_upload_bytes / 2**20:.0f} MB (server option --max-upload-mb)"
