"""The web app: create a model, upload books, train, watch, generate, compare and download it.

    python server.py                      # http://127.0.0.1:8000, data in $AZR_HOME or here
    python server.py --port 8080 --home ~/azr --max-upload-mb 200
    python server.py --host 0.0.0.0 --allowed-host mybox.lan   # reachable from the LAN as mybox.lan

A thin JSON API over the same library the CLI calls (store, runs, generate, inside), plus one
page (templates/index.html + the ES modules in static/) that uses exactly this API; FastAPI
documents every endpoint at /docs. The API is a few routers in app/web/, one per tab of the page,
plus OpenAI's API on /v1 for other tools; this file puts them together and starts the server.
Three pieces hold the state that outlives a request (app/web/common.py: App):

- JobRunner (app/jobs.py): the one training job, in a background thread, persisted under jobs/.
- ModelCache (app/web/model_cache.py): each model loaded once for generation, reloaded when its
  files change on disk, so generating stays fast and never shows stale weights.
- The store: everything else is files, read on every request.

Errors a user can cause become 4xx JSON {"error": "...", "field": "..."}; anything else a 500
with the same shape, and the server keeps running (app/web/errors.py). Binding 127.0.0.1 keeps
other machines out; the site guard (app/web/guard.py) keeps other sites' pages out too.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import fastapi_offline
import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import config
from app.web import books, generation, inside, models, openai, page, training
from app.web.common import MAX_JSON_BYTES, MAX_UPLOAD_MB, App, errors
from app.web.errors import add_error_handlers
from app.web.guard import allowed_hosts, guard_site
from files import StoreError
from app.store import HOME_HELP

ROOT = Path(__file__).resolve().parent
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI 5, for OpenAPI 3.1


def create_app(home=None, max_upload_mb=MAX_UPLOAD_MB, hosts=None, api_key=None):
    """A new app over the store at `home`, answering to `hosts` (see allowed_hosts; default: this
    machine's loopback names on any port), its /v1 guarded by `api_key` (app/web/openai.py). Tests
    build several on one home to mimic restarts."""
    app = FastAPI(title="AZR Model Trainer", version=config.VERSION, docs_url=None, redoc_url=None,
                  responses=errors(400, 404, 409, 422, 500),
                  description="Train small GPTs on books. Errors are JSON: {\"error\": \"...\", \"field\": \"...\"}.")
    app.state.azr = azr = App(home, max_upload_mb, api_key)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    # max_body_size counts the bytes as they arrive, before any parsing: a 100 MB JSON body is cut
    # off at MAX_JSON_BYTES instead of becoming 400 MB of Python objects, and a chunked upload (no
    # Content-Length) at the upload limit instead of being spooled to a temp file in full
    for section in (page, models, training, generation, inside, openai):
        app.include_router(section.router, max_body_size=MAX_JSON_BYTES, responses=errors(413))
    app.include_router(books.router, max_body_size=azr.max_upload_bytes + 2**16,  # + room for the multipart headers
                       responses=errors(413))
    add_error_handlers(app, azr)
    guard_site(app, hosts or allowed_hosts("127.0.0.1", None))  # added last: it runs first
    return app


def main(argv=None):
    p = argparse.ArgumentParser(description="AZR Model Trainer web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="another name the server is reached by, e.g. mybox.lan (repeatable); "
                        "requests addressed to any other name are refused (DNS-rebinding guard)")
    p.add_argument("--home", help=HOME_HELP)
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help=f"largest book upload, in MB (default: {MAX_UPLOAD_MB})")
    p.add_argument("--api-key", default=os.environ.get("AZR_API_KEY") or None, metavar="KEY",
                   help="let clients of the OpenAI-compatible /v1 in from other machines when they send "
                        "'Authorization: Bearer KEY' (default: $AZR_API_KEY; none: /v1 answers this machine only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = create_app(args.home, args.max_upload_mb, allowed_hosts(args.host, args.port, args.allowed_host),
                         args.api_key)
    except StoreError as e:  # a --home the data cannot live in
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"AZR Model Trainer: http://{args.host}:{args.port}  (data in {app.state.azr.store.home})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
