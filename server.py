"""The web app: create a model, upload books, train, watch, generate, compare and download it.

    python server.py                      # http://127.0.0.1:8000, data in $AZR_HOME or here
    python server.py --port 8080 --home ~/azr --max-upload-mb 200
    python server.py --host 0.0.0.0 --allowed-host mybox.lan   # reachable from the LAN as mybox.lan

A thin JSON API over the same library the CLI calls (store, runs, generate, inside), plus one
page (templates/index.html + the ES modules in static/) that uses exactly this API; FastAPI documents every
endpoint at /docs (Swagger UI's files come from the fastapi-offline package: no CDN). The API is
a few routers, one per tab of the page, plus OpenAI's API on /v1 for other tools (openai_api.py);
each handler reads its request, calls the library and
returns what it got. Request bodies are derived from the settings dataclasses (ModelConfig,
TrainConfig, SamplingConfig, LoRAConfig), so a field, its default and its range are defined once. Three pieces hold the state that outlives a request:

- JobRunner (jobs.py): the one training job, in a background thread, persisted under jobs/.
- ModelCache: each model (or model + LoRA adapter) is loaded once for generation and reloaded
  when its files change on disk (a finished run, a rollback), so generating stays fast and never
  shows stale weights.
- The store: everything else is files, read on every request.

Errors a user can cause become 4xx JSON {"error": "...", "field": "..."} (the schema's ErrorBody);
anything else becomes a 500 with the same shape, and the server keeps running. No error shows
where the data folder is. Downloads export the model on the fly through export.py: the same
files `cli.py export` writes.

Binding 127.0.0.1 keeps other machines out, but not a web page in the user's own browser: any
site can send requests to http://127.0.0.1:8000, and a DNS-rebinding site can even read the
answers. `guard_site` (at the end of this file) answers only requests addressed to this server
by name (the Host header) and refuses requests sent by another site's page (the Origin
header), so only this server's own page, curl and scripts can drive it.
"""

import argparse
import asyncio
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import fastapi_offline
import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

import config
import export
import inside
import openai_api
import runs
from azr_trainer import TrainConfig
from files import CorruptFile, Exists, InUse, NotFound, StoreError, hide_paths
from generate import SamplingConfig, joined, stream
from hardware import pick_device
from jobs import ACTIVE, RESUMABLE, Busy, JobRunner
from lora import TARGETS, LoRAConfig
from model import PRESETS, ModelConfig
from sizing import flops_per_token, memory_estimate, param_count
from store import HOME_HELP, Store, check_name
from tokenizer import LANGUAGE_NAMES

ROOT = Path(__file__).resolve().parent
MAX_UPLOAD_MB = 50
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "lineage.json", "metrics.jsonl")
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors", "metrics.jsonl")
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI 5, for OpenAPI 3.1
MAX_PROMPT_CHARS = 100_000  # the model sees at most max_seq_len tokens of it anyway
MAX_ERROR_CHARS = 2000  # an error message is cut here: it never sends a huge request back
# every request body but an upload: the longest prompt, each character escaped (\\uXXXX), fits
MAX_JSON_BYTES = 6 * MAX_PROMPT_CHARS + 2**16
ARENA_MAX_WINDOWS = 256
# Generation runs on one CPU thread. Decoding one token is a chain of small matrix-vector products
# where handing work between OpenMP threads costs more than it saves, and when a training job
# keeps the cores busy the threads stall waiting for each other. With torch's OpenMP backend the
# setting is per thread, so the training thread keeps all of its threads.
GENERATION_THREADS = 1
# Generation has its own threads, so that /health and every other request never wait behind it:
# half the cores (training keeps the rest), and at most GENERATION_QUEUE requests running or
# waiting for one; beyond that, 429 with Retry-After instead of an ever longer queue
GENERATION_WORKERS = max(2, (os.cpu_count() or 2) // 2)
GENERATION_QUEUE = 32
GENERATION_RETRY_AFTER_S = 5
SERVER_CHOOSES = {"device"}  # TrainConfig fields the web API does not offer: the server's device is used

log = logging.getLogger("azr.server")


# ----------------------------------------------------------------------------- request bodies


class Body(BaseModel):
    # a misspelt option is an error, not silently ignored; "5" is not a number; "model_*" names are ours
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


def settings_fields(cls, skip=(), prefix=""):
    """Pydantic fields for the fields of a settings dataclass: the same types and defaults, the
    help as description, the range in the schema. The range itself is checked by cls.validate,
    so that a value out of range is a 400 naming the field, like every other value we cannot use."""
    out = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, optional = config.field_type(cls, f)
        kind = list[str] if kind is tuple else kind
        m = f.metadata
        schema = {k: v for k, v in (("minimum", m["lo"]), ("maximum", m["hi"])) if v is not None}
        if m["choices"]:
            kind = Literal[m["choices"]] if kind is str else list[Literal[m["choices"]]]
        default = config.default_of(f)
        out[prefix + f.name] = (kind | None if optional else kind,
                                Field(list(default) if isinstance(default, tuple) else default,
                                      description=m["help"], json_schema_extra=schema or None))
    return out


CreateModelRequest = create_model(
    "CreateModelRequest", __base__=Body, __doc__="A preset, or the config numbers; numbers given next to a preset override it.",
    name=(str, ...), preset=(Literal[tuple(PRESETS)] | None, None),
    seed=(int, Field(0, json_schema_extra={"minimum": 0, "maximum": config.SEED_MAX})),  # checked by the store
    **{k: (v[0] | None, None) for k, v in settings_fields(ModelConfig).items()})

TrainRequest = create_model(
    "TrainRequest", __base__=Body,
    __doc__="Train `model` on `books` (or one `book`); mode=lora fine-tunes an adapter named `adapter` "
            "(options prefixed lora_) on top of the frozen model.",
    model=(str, ...), book=(str | None, None), books=(list[str], []),
    mode=(Literal["full", "lora"], "full"), adapter=(str | None, None),
    **settings_fields(TrainConfig, skip=SERVER_CHOOSES), **settings_fields(LoRAConfig, prefix="lora_"))

SamplingRequest = create_model("SamplingRequest", __base__=Body, prompt=(str, Field("", max_length=MAX_PROMPT_CHARS)),
                               **settings_fields(SamplingConfig))


class GenerateRequest(SamplingRequest):
    model: str
    adapter: str | None = None


class AttentionRequest(Body):
    """Attention weights of one layer and head over the prompt; head=null averages the heads."""
    model: str
    adapter: str | None = None
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    layer: int = 0
    head: int | None = 0


class ArenaRequest(SamplingRequest):
    """The same prompt (and seed) through two models; with `book`, also their bits/byte on it."""
    model_a: str
    model_b: str
    adapter_a: str | None = None
    adapter_b: str | None = None
    book: str | None = None
    windows: int = Field(64, json_schema_extra={"minimum": 1, "maximum": ARENA_MAX_WINDOWS})


class RollbackRequest(Body):
    version: str


class ResumeRequest(Body):
    """changed_data: go on although a book's text changed since the run started (the lineage says so)."""
    changed_data: bool = False


class MergeRequest(Body):
    """A new model `out`: `model` with its LoRA `adapter` merged into the weights."""
    model: str
    adapter: str
    out: str


# ----------------------------------------------------------------------------- responses
# The main answers, as the schema shows them; extra="allow" so that documenting a field never drops one.


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ErrorBody(Answer):
    """Every error: what went wrong and what to do; `field` names the form field to blame, if one is."""
    error: str
    field: str | None = None


ERRORS = {400: "a value we cannot use", 404: "unknown model, book, version or adapter",
          409: "name taken, a job already running, or nothing to stop or resume",
          413: "upload over the limit (--max-upload-mb), or a request body over MAX_JSON_BYTES",
          422: "a malformed request: wrong type, unknown field",
          429: "too many generations running or waiting: try again after Retry-After seconds",
          500: "a bug or a damaged file on disk; the server keeps running"}


def errors(*codes):
    return {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}


class Health(Answer):
    ok: bool
    device: str
    models: int
    books: int
    job: str
    generating: int
    max_upload_bytes: int
    damaged: list[str]  # models, books and job files that cannot be read (names)
    damaged_books: list[str]
    damaged_jobs: list[str]


class Damaged(Answer):
    """A model, book or adapter whose files cannot be read: its name, what is wrong and what to do."""
    name: str
    damaged: str


class ModelInfo(Answer):
    name: str
    config: dict[str, Any]
    params: int
    size_bytes: int
    steps: int
    best_val_bpb: float | None
    parent: str | dict[str, str] | None
    books: list[dict[str, str]]
    versions: list[dict[str, Any]]
    created: str
    has_tokenizer: bool
    adapters: list[Any]


class ModelDetail(ModelInfo):
    runs: list[dict[str, Any]]
    training: bool


class BookInfo(Answer):
    name: str
    sha256: str
    characters: int
    encoding: str
    language: str


class Job(Answer):
    """The training job; state is idle, queued, running, done, stopped, failed or interrupted."""
    state: str
    seq: int
    events: list[dict[str, Any]]


class Generated(Answer):
    text: str
    seconds: float


def settings_from(req, cls, prefix=""):
    """The dataclass `cls` from the matching fields of a request body, validated."""
    return config.build(cls, {f.name: getattr(req, prefix + f.name) for f in fields(cls) if hasattr(req, prefix + f.name)},
                        prefix)


# ----------------------------------------------------------------------------- the app


class App:
    """What the handlers share (also openai_api's): the store, the job runner, the model cache, the
    device, the limits, the API key of /v1 (None: none)."""

    def __init__(self, home, max_upload_mb, api_key=None):
        self.store = Store(home)
        self.store.sweep_temp_files()  # left by a kill -9 of the last server, or of a CLI run
        sweep_downloads()
        self.jobs = JobRunner(self.store)
        self.device = pick_device("auto")
        self.models = ModelCache(self.store, self.device)
        self.generation = GenerationQueue()
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_prompt_chars, self.generation_threads = MAX_PROMPT_CHARS, GENERATION_THREADS
        self.api_key = api_key


def app_of(request: Request) -> App:
    return request.app.state.azr


Azr = Annotated[App, Depends(app_of)]


async def generation_slot(azr: Azr):
    """A slot in the generation queue for the whole request (a stream: until its last event)."""
    with azr.generation.slot():
        yield


GenerationSlot = Annotated[None, Depends(generation_slot)]


def create_app(home=None, max_upload_mb=MAX_UPLOAD_MB, hosts=None, api_key=None):
    """A new app over the store at `home`, answering to `hosts` (see allowed_hosts; default: this
    machine's loopback names on any port), its /v1 guarded by `api_key` (openai_api.py). Tests
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
    for router in (page, models, training, generation, look_inside, openai_api.router):
        app.include_router(router, max_body_size=MAX_JSON_BYTES, responses=errors(413))
    app.include_router(books, max_body_size=azr.max_upload_bytes + 2**16,  # + room for the multipart headers
                       responses=errors(413))
    add_error_handlers(app, azr)
    guard_site(app, hosts or allowed_hosts("127.0.0.1", None))  # added last: it runs first
    return app


# ----------------------------------------------------------------------------- page and health

page = APIRouter()
templates = Jinja2Templates(directory=ROOT / "templates")


@page.get("/", include_in_schema=False)
def index(request: Request, azr: Azr):
    return templates.TemplateResponse(request, "index.html", {"page": page_data(azr)})


def page_data(azr):
    """What the page needs before its first request: presets, every form field's default,
    range, choices, kind and help (from the settings dataclasses), which training fields the
    page offers, the job states, the languages a book can be in, the upload limit."""
    def specs(cls):
        return {f.name: {"default": config.default_of(f), "lo": f.metadata["lo"], "hi": f.metadata["hi"],
                         "choices": f.metadata["choices"], "kind": config.field_type(cls, f)[0].__name__,
                         "help": f.metadata["help"]} for f in fields(cls)}
    return {"presets": {k: v.to_dict() for k, v in PRESETS.items()}, "model": specs(ModelConfig),
            "train": specs(TrainConfig), "sampling": specs(SamplingConfig), "lora": specs(LoRAConfig),
            "train_offered": [f.name for f in fields(TrainConfig) if f.name not in SERVER_CHOOSES],
            "lora_targets": TARGETS, "max_upload_bytes": azr.max_upload_bytes,
            "job_states": {"active": ACTIVE, "resumable": RESUMABLE}, "languages": LANGUAGE_NAMES}


@page.get("/docs", include_in_schema=False)
def docs():
    """Swagger UI from the pip package's files, so the docs work offline."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="AZR Model Trainer API",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon.png")


@page.get("/health", summary="Server is up: device, counts, job state, generations running or waiting; the "
                             "models, books and job files that are damaged", response_model=Health)
def health(azr: Azr):
    models_, books_ = azr.store.list_models(), azr.store.list_books()
    return {"ok": True, "device": str(azr.device), "models": len(models_),
            "damaged": [m["name"] for m in models_ if "damaged" in m],
            "books": len(books_), "damaged_books": [b["name"] for b in books_ if "damaged" in b],
            "damaged_jobs": [j["name"] for j in azr.jobs.damaged], "job": azr.jobs.status()["state"],
            "generating": azr.generation.taken, "max_upload_bytes": azr.max_upload_bytes}


# ----------------------------------------------------------------------------- models

models = APIRouter(tags=["models"])


@models.get("/estimate", summary="Parameter count and training memory of a config (live form check)")
def estimate(vocab_size: int = ModelConfig.vocab_size, d_model: int = ModelConfig.d_model,
             num_layers: int = ModelConfig.num_layers, num_heads: int = ModelConfig.num_heads,
             d_ff: int = ModelConfig.d_ff, max_seq_len: int = ModelConfig.max_seq_len,
             batch_size: int = TrainConfig.batch_size):
    cfg = ModelConfig(vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_len).validate()
    TrainConfig(batch_size=batch_size).validate()
    return {"params": param_count(cfg), "memory": memory_estimate(cfg, batch_size),
            "flops_per_token": flops_per_token(cfg), "batch_size": batch_size}


@models.post("/create_model", status_code=201, summary="Create a model from a preset or the config numbers",
             response_model=ModelInfo)
def create_model_(req: CreateModelRequest, azr: Azr):
    base = PRESETS[req.preset].to_dict() if req.preset else ModelConfig().to_dict()
    given = req.model_dump(exclude={"name", "preset", "seed"}, exclude_none=True)
    azr.store.create_model(req.name, ModelConfig.from_dict({**base, **given}), seed=req.seed)
    return azr.store.info(req.name)


@models.get("/models", summary="All models: params, size on disk, steps, best val bits/byte, lineage "
                                "(a model whose files cannot be read: {name, damaged})",
            response_model=list[ModelInfo | Damaged])
def list_models(azr: Azr):
    return azr.store.list_models()


@models.get("/models/{name}", summary="One model: info, runs, versions, adapters", response_model=ModelDetail)
def model_info(name: str, azr: Azr):
    info = azr.store.info(name)
    adapters = [adapter_or_damaged(azr.store, name, a) for a in info["adapters"]]
    return {**info, "adapters": adapters, "runs": azr.store.lineage(name)["runs"], "training": azr.jobs.is_active(name)}


def adapter_or_damaged(store, name, adapter):
    try:
        return store.adapter_info(name, adapter)
    except CorruptFile as e:
        return {"name": adapter, "damaged": str(e)}


@models.get("/models/{name}/metrics", summary="Rows of metrics.jsonl from line `since`, optionally one run or adapter")
def model_metrics(name: str, azr: Azr, since: int = Query(0, ge=0), run: str | None = None, adapter: str | None = None):
    rows = azr.store.metrics(name, since, adapter)
    # a resume rewrites the file without the steps it redoes, so `since` can point past its end:
    # then the client starts over from line 0
    reset = not rows and since > 0 and len(azr.store.metrics(name, 0, adapter)) < since
    if reset:
        rows = azr.store.metrics(name, 0, adapter)
    return {"rows": [r for r in rows if run is None or r.get("run") == run],
            "next": (0 if reset else since) + len(rows), "reset": reset}


@models.get("/models/{name}/step_time", summary="Time per training step on this machine: a probe of a few steps")
def step_time(name: str, azr: Azr, batch_size: int = TrainConfig.batch_size, seq_len: int = TrainConfig.seq_len,
              grad_accum: int = TrainConfig.grad_accum, steps: int = TrainConfig.steps,
              minutes: float = TrainConfig.minutes, precision: str = TrainConfig.precision,
              compile: str = TrainConfig.compile):
    if azr.jobs.is_active():  # the probe would slow the run down, and the run would slow the probe
        raise Busy("a training job is running: the time estimate waits for it to end")
    tc = TrainConfig(steps=steps, minutes=minutes, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                     precision=precision, compile=compile, device=str(azr.device))
    return runs.step_time(azr.store, name, tc.validate())


@models.get("/models/{name}/selfplay_example", summary="The latest self-play rollout: the tokens it wrote and the repeats it pushed down")
def selfplay_example(name: str, azr: Azr, adapter: str | None = None):
    rows = [r for r in azr.store.metrics(name, 0, adapter) if "example" in r.get("selfplay", {})]
    tok = azr.store.tokenizer(name)
    if not rows or tok is None:
        raise NotFound(f"model {name!r} has no self-play steps yet: train it with self-play on")
    return {"step": rows[-1]["step"], "run": rows[-1]["run"], **inside.selfplay_rollout(rows[-1]["selfplay"]["example"], tok)}


@models.delete("/models/{name}", summary="Delete a model, its versions and checkpoints")
def delete_model(name: str, azr: Azr):
    refuse_while_training(azr.jobs, name, "delete")
    azr.store.delete_model(name)
    azr.models.forget(name)
    return {"deleted": name}


@models.delete("/models/{name}/adapters/{adapter}", summary="Delete one LoRA adapter of a model")
def delete_adapter(name: str, adapter: str, azr: Azr):
    refuse_while_training(azr.jobs, name, "delete an adapter of")
    azr.store.delete_adapter(name, adapter)
    azr.models.forget(name)
    return {"deleted": adapter, "model": name}


@models.post("/models/{name}/rollback", summary="Make a saved version the current weights", response_model=ModelInfo)
def rollback(name: str, req: RollbackRequest, azr: Azr):
    refuse_while_training(azr.jobs, name, "roll back")
    azr.store.rollback(name, req.version)
    return azr.store.info(name)


@models.post("/merge", status_code=201, summary="Merge a LoRA adapter into a new model", response_model=ModelInfo)
def merge(req: MergeRequest, azr: Azr):
    azr.store.merge_adapter(req.model, req.adapter, req.out)
    return azr.store.info(req.out)


DOWNLOADED = {200: {"content": {"application/zip": {}, "application/octet-stream": {}}, "description": "the file"}}


@models.get("/download_model/{name}", response_class=FileResponse, responses=DOWNLOADED,
            summary="The model as this app's zip, a Hugging Face folder (zip), a GGUF file for llama.cpp, "
                    "or that GGUF with its Ollama Modelfile (zip)")
def download_model(name: str, azr: Azr, format: Literal["native", "hf", "gguf", "ollama"] = "native",
                   dtype: Literal[tuple(export.DTYPES)] = Query("f32", description="hf, gguf, ollama: f32, f16, "
                                                                                   "q8_0 (not hf)")):
    if format == "native":
        return send_built(lambda tmp: build_model_zip(azr.store, name, tmp), f"{name}.zip", azr.store, name)
    filename = f"{name}-{dtype}.gguf" if format == "gguf" else f"{name}-{format}.zip"
    return send_built(lambda tmp: build_export(azr.store, name, format, dtype, None, tmp), filename, azr.store, name)


@models.get("/download_adapter/{name}/{adapter}", response_class=FileResponse, responses=DOWNLOADED,
            summary="A LoRA adapter as this app's zip or a PEFT folder (zip)")
def download_adapter(name: str, adapter: str, azr: Azr, format: Literal["native", "peft"] = "native",
                     dtype: Literal["f32", "f16"] = "f32"):
    d = azr.store.adapter_dir(name, adapter)
    if format == "native":
        return send_built(lambda tmp: zip_folder(d, [f for f in ADAPTER_FILES if (d / f).exists()], adapter,
                                                 tmp / f"{adapter}.zip"), f"{adapter}.zip", azr.store, name, adapter)
    return send_built(lambda tmp: build_export(azr.store, name, format, dtype, adapter, tmp), f"{adapter}-{format}.zip",
                      azr.store, name, adapter)


# ----------------------------------------------------------------------------- books

books = APIRouter(tags=["books"])


@books.post("/upload_book", status_code=201, summary="Upload a .txt (any encoding), .fb2 or .epub book")
def upload_book(azr: Azr, file: UploadFile = File(...), name: str | None = Form(None)):
    data = read_upload(file, azr.max_upload_bytes)
    name = check_name(name or book_name_from(file.filename), "book")
    info = azr.store.add_book(name, data, file.filename or "book.txt", max_bytes=azr.max_upload_bytes)
    return {**info, "preview": preview(azr.store.book_text(name))}


@books.get("/books", summary="Uploaded books with size, encoding and language (a book whose info cannot be read: "
                             "{name, damaged})", response_model=list[BookInfo | Damaged])
def list_books(azr: Azr):
    return [{**b, "first_line": first_line_of(azr.store, b["name"])} for b in azr.store.list_books()]


def first_line_of(store, name, chars=4096):
    """A book's first line, the page's default prompt for a model trained on it (as the samples'
    while training, runs.first_line); only the start of the book is read."""
    try:
        with store.book_path(name).open(encoding="utf-8") as f:
            return runs.first_line(f.read(chars))
    except (OSError, ValueError):  # deleted meanwhile, or not UTF-8 yet (dropped in by hand): no default
        return None


@books.get("/books/{name}", summary="One book's info and the first lines of its text")
def book_info(name: str, azr: Azr):
    return {**azr.store.book_info(name), "preview": preview(azr.store.book_text(name))}


@books.delete("/books/{name}", summary="Delete a book")
def delete_book(name: str, azr: Azr):
    azr.store.delete_book(name)
    return {"deleted": name}


# ----------------------------------------------------------------------------- training

training = APIRouter(tags=["training"])


@training.post("/train", status_code=202, summary="Start a training job, or a LoRA fine-tune (409 if one is running)",
               response_model=Job)
def train(req: TrainRequest, azr: Azr):
    store, books_ = azr.store, ([req.book] if req.book else []) + req.books
    tc = settings_from(req, TrainConfig)
    check_training_inputs(store, req.model, books_)
    runs.check_fits(store, req.model, tc)
    job = {"kind": req.mode, "model": req.model, "adapter": None, "books": books_, "config": asdict(tc),
           "state": "queued", "step": 0, "total": tc.steps}
    if req.mode == "full":
        return azr.jobs.start(job, lambda on_event, should_stop: runs.train(
            store, req.model, books_, tc, on_event, should_stop))
    lc = lora_config(store, req)
    job.update(adapter=req.adapter, lora=lc.to_dict())
    return azr.jobs.start(job, lambda on_event, should_stop: runs.finetune(
        store, req.model, books_, tc, req.adapter, lc, on_event, should_stop))


@training.get("/training_status", summary="The current job: state, step/total, losses, bits/byte, reward, tokens/s, ETA, log",
              response_model=Job)
def training_status(azr: Azr, since: int = Query(0, ge=0, description="only log events with seq > since")):
    return azr.jobs.status(since)


@training.post("/stop_training", summary="Stop the job after its current step (it saves a checkpoint)")
def stop_training(azr: Azr):
    return azr.jobs.stop()


@training.post("/resume_training", summary="Continue a stopped, interrupted or failed job from its checkpoint, "
                                          "on the books it started with")
def resume_training(azr: Azr, req: ResumeRequest | None = None):
    store, job, changed = azr.store, azr.jobs.status(), req is not None and req.changed_data
    if job["state"] in RESUMABLE:
        check_resumable(store, job["model"], job.get("adapter"), changed)
    return azr.jobs.resume(lambda on_event, should_stop: runs.resume(
        store, job["model"], on_event, should_stop, adapter=job.get("adapter"), changed_data=changed))


def check_training_inputs(store, model, books_):
    """Everything a job needs, checked now so the user gets the error instead of a failed job.
    Books must be uploaded books: the web API never reads a path on the server."""
    store.model_dir(model)
    if not books_:
        raise ValueError("choose at least one book to train on")
    runs.check_books(books_)
    for b in books_:
        store.book_info(b)


def lora_config(store, req):
    """The LoRA options of a fine-tune request, checked before the job starts."""
    if not req.adapter:
        raise ValueError("name the adapter to train (mode=lora saves it under the model's adapters)")
    check_name(req.adapter, "adapter")
    if store.tokenizer(req.model) is None:
        raise ValueError(f"model {req.model!r} has no tokenizer yet: train it on a book before fine-tuning it")
    if req.adapter in store.list_adapters(req.model):
        raise Exists(f"model {req.model!r} already has an adapter {req.adapter!r}; pick another name")
    return settings_from(req, LoRAConfig, prefix="lora_")


def check_resumable(store, model, adapter=None, changed_data=False):
    try:
        runs.load_run(store, model, adapter, changed_data)
    except NotFound:
        raise Busy(f"model {model!r} has no checkpointed run to resume (it failed before its first step); "
                   "start a new training run instead") from None
    except CorruptFile:
        raise
    except ValueError as e:
        raise Busy(str(e)) from None


def refuse_while_training(jobs, name, what):
    if jobs.is_active(name):
        raise Busy(f"cannot {what} model {name!r} while it is training; stop the job first")


# ----------------------------------------------------------------------------- generation

generation = APIRouter(tags=["generation"])


@generation.post("/generate", summary="Continue a prompt; the whole text at once (429 when too many wait)",
                 response_model=Generated, responses=errors(429))
async def generate_text(req: GenerateRequest, request: Request, azr: Azr, _: GenerationSlot):
    return await azr.generation.run(request, generate_until, azr, req)


def generate_until(cancelled, azr, req):
    """The generation of one request, on a generation thread; Abandoned once `cancelled` is set."""
    model, tok = azr.models.get(req.model, req.adapter)
    sc = settings_from(req, SamplingConfig)
    t0 = time.perf_counter()
    text = joined(until(cancelled, stream(model, tok, req.prompt, sc, azr.device)), sc.stop)
    return {"text": text, "seconds": round(time.perf_counter() - t0, 3)}


def stream_request(req: GenerateRequest, azr: Azr):
    """What a stream needs, loaded and checked before its 200 header: errors are still plain 4xx JSON."""
    model, tok = azr.models.get(req.model, req.adapter)
    return model, tok, req.prompt, settings_from(req, SamplingConfig), azr.device


@generation.post("/generate_stream", summary="Continue a prompt as Server-Sent Events, one per token",
                 response_class=EventSourceResponse,
                 responses={200: {"description": "data: {text, token, prob, top: [[text, prob] x5]} per token, then "
                                                 "event: done with {tokens, seconds, first_token_s}; `: ping` "
                                                 "comments keep an idle connection open"}, **errors(429)})
async def generate_stream(args: Annotated[tuple, Depends(stream_request)], azr: Azr, _: GenerationSlot):
    """FastAPI frames each yielded event (fastapi.sse) and sends a keep-alive ping when none
    comes for 15 s, e.g. while a long prompt is read. Each token is made on a generation thread;
    when the client leaves, FastAPI stops asking for the next one."""
    events = sse_tokens(*args)
    while (event := await azr.generation.next(events)) is not None:
        yield event


@generation.post("/attention", summary="Attention weights (T x T) of one layer/head over the prompt")
def attention(req: AttentionRequest, azr: Azr):
    model, tok = azr.models.get(req.model, req.adapter)
    torch.set_num_threads(GENERATION_THREADS)
    return inside.attention_map(model, tok, req.prompt, req.layer, req.head)


@generation.post("/arena", summary="Two models, one prompt and seed, side by side (+ bits/byte on a book)",
                 responses=errors(429))
async def arena(req: ArenaRequest, request: Request, azr: Azr, _: GenerationSlot):
    return await azr.generation.run(request, arena_sides, azr, req)


def arena_sides(cancelled, azr, req):
    sc = settings_from(req, SamplingConfig)
    if not 1 <= req.windows <= ARENA_MAX_WINDOWS:
        raise ValueError(f"windows must be between 1 and {ARENA_MAX_WINDOWS}")
    if sc.seed is None:  # both sides draw the same random numbers: a fair comparison
        sc.seed = secrets.randbelow(2**31)  # not torch's generator: training re-seeds it
    if req.book:
        azr.store.book_info(req.book)
    sides = {}
    for side, name, adapter in (("a", req.model_a, req.adapter_a), ("b", req.model_b, req.adapter_b)):
        model, tok = azr.models.get(name, adapter)
        text = joined(until(cancelled, stream(model, tok, req.prompt, sc, azr.device)), sc.stop)
        # how much it loops: the share of its 4-token pieces that repeat an earlier one (seq-rep-4)
        sides[side] = {"model": name, "adapter": adapter, "text": text, "repeats": inside.seq_rep_n(tok.encode(text), 4)}
        if req.book:
            sides[side]["bits_per_byte"] = runs.evaluate_on_book(azr.store, model, tok, req.book, req.windows,
                                                                 azr.device)["val_bpb"]
    return {**sides, "seed": sc.seed, "book": req.book}


def sse_tokens(model, tok, prompt, sc, device):
    """Server-Sent Events: one `data:` event of JSON per token, then `event: done` (or `error`)."""
    t0, first, n = time.perf_counter(), None, 0
    try:
        for text, token, probs in stream(model, tok, prompt, sc, device):
            first = first or time.perf_counter() - t0
            n += 1
            piece = {"text": text, "token": token, "prob": None if probs is None else probs[token].item(),
                     "top": [] if probs is None else inside.top_alternatives(tok, probs)}
            yield ServerSentEvent(data=piece)
        done = {"tokens": n, "seconds": round(time.perf_counter() - t0, 4), "first_token_s": round(first or 0, 4)}
        yield ServerSentEvent(event="done", data=done)
    except Exception as e:  # the 200 header is gone: report the error in the stream itself
        log.exception("generation failed")
        yield ServerSentEvent(event="error", data={"error": str(e)})


# ----------------------------------------------------------------------------- look inside

look_inside = APIRouter(prefix="/inside", tags=["look inside"])
MAX_TOKENIZE_CHARS = 20_000  # a page of coloured chunks; a whole book is counted through `book`
RUNS_MAX_MODELS = 4


class TokensRequest(Body):
    """`text` cut into tokens by `model`'s tokenizer; with `book`, also the book's numbers."""
    model: str
    text: str = Field("", max_length=MAX_TOKENIZE_CHARS)
    book: str | None = None


NextTokenRequest = create_model(
    "NextTokenRequest", __base__=Body, __doc__="The next-token distribution after `prompt`, before and after sampling.",
    model=(str, ...), adapter=(str | None, None), prompt=(str, Field("", max_length=MAX_PROMPT_CHARS)),
    bars=(int, Field(20, ge=1, le=100)), **settings_fields(SamplingConfig, skip={"max_new_tokens", "seed", "stop"}))


@look_inside.post("/tokens", summary="A text (or a book) cut into tokens: ids, bytes per token, common tokens, longest merges")
def inside_tokens(req: TokensRequest, azr: Azr):
    _, tok = azr.models.get(req.model)
    return inside.tokenizer_view(azr.store, tok, req.text, req.book)


@look_inside.post("/next_token", summary="The model's next-token probabilities and what temperature/top-k/top-p make of them")
def inside_next_token(req: NextTokenRequest, azr: Azr):
    model, tok = azr.models.get(req.model, req.adapter)
    torch.set_num_threads(GENERATION_THREADS)
    return inside.next_token_view(model, tok, req.prompt, settings_from(req, SamplingConfig), req.bars)


@look_inside.get("/embeddings", summary="A 2-D PCA map of the embeddings of a book's commonest tokens, for any version")
def inside_embeddings(azr: Azr, model: str, version: str | None = None, book: str | None = None,
                      n: int = Query(200, ge=3, le=1000)):
    current, tok = azr.models.get(model)
    weights = azr.store.load_model(model, version=version) if version else current
    book = book or inside.default_book(azr.store, model)
    if book is None:
        raise ValueError(f"model {model!r} was trained on no book that is still uploaded: pick a book")
    counts = inside.token_counts(azr.store, tok, book)
    return {**inside.embedding_map(weights, tok, counts, n), "model": model, "version": version, "book": book}


@look_inside.get("/nf4", summary="One layer in NF4: the 16 levels on its weights' histogram, error, bits, bytes")
def inside_nf4(azr: Azr, model: str, layer: str | None = None):
    torch.set_num_threads(GENERATION_THREADS)
    return {**inside.nf4_view(azr.store.load_model(model), layer), "model": model}


@look_inside.get("/runs", summary="Loss and val bits/byte curves of every run of one or more models, with settings")
def inside_runs(azr: Azr, model: Annotated[list[str], Query()]):
    if len(model) > RUNS_MAX_MODELS:
        raise ValueError(f"compare at most {RUNS_MAX_MODELS} models at once")
    return inside.run_curves(azr.store, model)


# ----------------------------------------------------------------------------- errors


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
        field = config_field(str(exc)) if isinstance(exc, ValueError) else None
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=error_status(exc))

    async def unexpected_error(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": said(f"internal error ({type(exc).__name__}): {exc}")}, status_code=500)

    # ValueError covers StoreError, BookError and every settings check
    for cls in (ValueError, Busy, Abandoned):
        app.add_exception_handler(cls, known_error)
    app.add_exception_handler(Exception, unexpected_error)

    @app.middleware("http")
    async def refuse_big_bodies(request, call_next):
        """Refuse an oversized body from its Content-Length, before reading it."""
        length, path = request.headers.get("content-length", ""), request.url.path
        limit = max_upload_bytes + 2**16 if path == "/upload_book" else MAX_JSON_BYTES
        if length.isdigit() and int(length) > limit:
            return JSONResponse({"error": too_big(path, max_upload_bytes)}, status_code=413)
        return await call_next(request)


class TooLarge(ValueError):
    pass


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


FORM_FIELDS = {f.name for cls in (ModelConfig, TrainConfig, SamplingConfig) for f in fields(cls)}
FORM_FIELDS |= {"lora_" + f.name for f in fields(LoRAConfig)}


def config_field(message):
    """The field to change, so the page can mark it: the one the message suggests ("try
    num_heads in ..."), else the one it starts with ("d_model must be between ...")."""
    m = re.search(r"\btry (\w+)", message) or re.match(r"(\w+) ", message)
    if not m:
        return None
    name = m.group(1)
    return name if name in FORM_FIELDS else "lora_" + name if "lora_" + name in FORM_FIELDS else None


def too_big(path, max_upload_bytes):
    if path != "/upload_book":
        return f"the request body is larger than the {MAX_JSON_BYTES // 1024:,} KB a request may send"
    return f"the file is larger than the upload limit of {max_upload_bytes / 2**20:.0f} MB (server option --max-upload-mb)"


# ----------------------------------------------------------------------------- helpers


class Abandoned(Exception):
    """The client of a generation left: its work stopped at the next token."""


class GenerationQueue:
    """Generation on threads of its own, a bounded number of requests at a time.

    A request takes a slot (429 with Retry-After when all GENERATION_QUEUE are taken) and its work
    runs on one of GENERATION_WORKERS threads, each decoding on GENERATION_THREADS CPU threads.
    The event loop meanwhile waits for the client to hang up (client_gone); if it does, the work's
    `cancelled` flag is set and `until` ends it before the next token. Slots are taken and given
    back on the event loop only, so `taken` needs no lock."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(GENERATION_WORKERS, thread_name_prefix="generate",
                                       initializer=torch.set_num_threads, initargs=(GENERATION_THREADS,))
        self.taken = 0

    @contextmanager
    def slot(self):
        if self.taken >= GENERATION_QUEUE:
            raise HTTPException(429, f"the server is busy: {self.taken} generations are running or waiting, the most it "
                                     f"takes at once; try again in {GENERATION_RETRY_AFTER_S} s",
                                headers={"Retry-After": str(GENERATION_RETRY_AFTER_S)})
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1

    async def run(self, request, work, *args):
        """work(cancelled, *args) on a generation thread -> its result; Abandoned if the client left."""
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.pool, work, cancelled, *args)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait([future, gone], return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                cancelled.set()  # the work raises Abandoned at its next token; we wait for that
            return await future
        finally:
            gone.cancel()
            cancelled.set()  # this request was cancelled itself (the server is shutting down)

    async def next(self, events):
        """The next item of a generator, made on a generation thread; None at its end."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, next, events, None)


async def client_gone(request):
    """Returns once the client has hung up. The body is read by now, so the server's next message
    is the disconnect (Starlette's is_disconnected() peeks without waiting, which the
    @app.middleware layers in between never answer in time)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def until(cancelled, pieces):
    """The pieces of a generation, each made only while `cancelled` is unset (a request whose
    client left while it waited for a thread never starts): then Abandoned."""
    pieces = iter(pieces)
    while not cancelled.is_set():
        piece = next(pieces, None)
        if piece is None:
            return
        yield piece
    raise Abandoned("the client left; generation stopped")


class ModelCache:
    """Models for generation, each loaded once and reloaded when its files change on disk.

    The key is (inode, mtime, size) of the weights, tokenizer and config: every write in the
    store replaces a file with os.replace, which gives it a new inode, so a finished run or a
    rollback is seen on the next request. The least recently used model is dropped past `size`."""

    def __init__(self, store, device, size=4):
        self.store, self.device, self.size = store, device, size
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name, adapter=None):
        """-> (model, tokenizer), with the LoRA adapter attached if one is named; 409 while the
        model has no tokenizer (never trained)."""
        d = self.store.model_dir(name)
        files = [d / f for f in ("model.safetensors", "tokenizer.json", "config.json")]
        if adapter:
            files.append(self.store.adapter_dir(name, adapter) / "adapter.safetensors")
        key = tuple(file_key(f) for f in files)
        with self.lock:
            hit = self.entries.get((name, adapter))
            if hit and hit[0] == key:
                self.entries.move_to_end((name, adapter))
                return hit[1], hit[2]
        with gone_is_not_found(self.store, name, adapter):
            tok = self.store.tokenizer(name)
            if tok is None:
                raise HTTPException(409, f"model {name!r} has no tokenizer yet: train it on a book first")
            if adapter:
                model = self.store.load_adapter(name, adapter, self.device)
            else:
                model = self.store.load_model(name, self.device).eval()
        with self.lock:
            self.entries[(name, adapter)] = (key, model, tok)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return model, tok

    def forget(self, name):
        with self.lock:
            for key in [k for k in self.entries if k[0] == name]:
                del self.entries[key]


@contextmanager
def gone_is_not_found(store, name, adapter=None):
    """A model or adapter deleted while a request reads its files fails the read: a file missing
    or cut off halfway. Answer as for one that was never there (NotFound: 404), not 500. While it
    is still there, the error is what it was."""
    try:
        yield
    except Exception:
        store.adapter_dir(name, adapter) if adapter else store.model_dir(name)  # NotFound once it is gone
        raise


def file_key(path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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


def preview(text, lines=12, chars=1200):
    return "\n".join(text[:chars].splitlines()[:lines])


# ----------------------------------------------------------------------------- download

README_TXT = """{name}: a GPT trained with AZR Model Trainer ({params:,} parameters, {steps} steps).

Files
  config.json        the ModelConfig (vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_len)
  model.safetensors  the weights, GPT-2 names (transformer.wte.weight, transformer.h.0.attn.c_attn.weight, ...);
                     lm_head is tied to transformer.wte.weight and not stored
  tokenizer.json     the byte-level BPE tokenizer (Hugging Face `tokenizers` format)
  lineage.json       parent, books (with sha256), runs, versions
  metrics.jsonl      one JSON line per training step (loss, val_bpb on evaluation steps, ...)

Load it with the project's code (run from the project folder, this folder unzipped next to it):

    import json
    from files import load_tensors
    from generate import SamplingConfig, generate
    from model import GPT, ModelConfig
    from store import load_weights
    from tokenizer import Tokenizer

    model = GPT(ModelConfig.from_dict(json.load(open("{name}/config.json"))))
    tensors, meta = load_tensors("{name}/model.safetensors")  # checks the sha256 too
    load_weights(model, tensors)
    tok = Tokenizer.load("{name}/tokenizer.json")
    print(generate(model, tok, "Once upon a time", SamplingConfig(max_new_tokens=100)))

Or put it back into a data folder: copy {name}/ to <AZR_HOME>/models/{name}/ and run
`python cli.py generate {name} --prompt "..."` or `python server.py`.
"""


DOWNLOAD_PREFIX = "azr-export-"  # the temp folders downloads are built in
STALE_DOWNLOAD_S = 60  # a younger folder may be one a server has made but not locked yet


def send_built(build, filename, store, name, adapter=None):
    """Build a download of model `name` (or its adapter) in a fresh temp folder (build(folder) -> the
    file to send) and send it as `filename`; the folder goes once it is sent. It is locked until
    then, so that a server started after one was killed mid-download removes that folder, and never
    a live one (sweep_downloads)."""
    folder = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    lock = FileLock(folder / ".lock", thread_local=False)  # released by the task that sends: another thread
    lock.acquire(timeout=0)

    def cleanup():
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()
    try:
        with gone_is_not_found(store, name, adapter):
            path = build(folder)
    except BaseException:
        cleanup()
        raise
    media = "application/zip" if filename.endswith(".zip") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=filename, background=BackgroundTask(cleanup))


def sweep_downloads():
    """Remove the download folders a killed server left in the temp dir: those whose lock no process
    holds. The lock, not a pid in the name, tells a dead server's folder from a live one's: pids are
    reused, and a server in another container that shares /tmp has pids we cannot see."""
    for d in Path(tempfile.gettempdir()).glob(DOWNLOAD_PREFIX + "*"):
        lock = FileLock(d / ".lock", thread_local=False)
        try:
            if time.time() - d.stat().st_mtime < STALE_DOWNLOAD_S:
                continue
            lock.acquire(timeout=0)
        except (OSError, Timeout):  # held by a live server; not a folder; another user's
            continue
        shutil.rmtree(d, ignore_errors=True)
        lock.release()


def build_model_zip(store, name, tmp):
    """The named model's files (only those) and a README, zipped into folder `tmp`."""
    d = store.model_dir(name)
    info = store.info(name)
    readme = README_TXT.format(name=name, params=info["params"], steps=info["steps"])
    names = [f for f in MODEL_FILES if (d / f).exists()]
    return zip_folder(d, names, name, tmp / f"{name}.zip", {"README.txt": readme})


def build_export(store, name, fmt, dtype, adapter, tmp):
    """The files `cli.py export` writes (export.py), in folder `tmp`: a GGUF file as it is (what
    llama.cpp and LM Studio open), a folder zipped, and for "ollama" the GGUF and its Modelfile
    zipped together."""
    stem, gguf = f"{adapter or name}-{fmt}", fmt in ("gguf", "ollama")
    out = export.export(store, name, "gguf" if gguf else fmt, tmp / (f"{name}-{dtype}.gguf" if gguf else stem),
                        adapter, dtype)
    if fmt == "gguf":
        return out
    folder, names = (tmp, [out.name, export.modelfile_of(out).name]) if gguf else \
        (out, sorted(p.name for p in out.iterdir()))
    return zip_folder(folder, names, stem, tmp / f"{stem}.zip")


def zip_folder(folder, names, prefix, path, extra=None):
    """Zip the files `names` of `folder` (only those) under `prefix`/, plus `extra` {name: text}, to `path`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for fname in names:
            z.write(folder / fname, f"{prefix}/{fname}")
        for fname, text in (extra or {}).items():
            z.writestr(f"{prefix}/{fname}", text)
    return path


# ----------------------------------------------------------------------------- the site guard

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")
CHANGES_STATE = {"POST", "PUT", "PATCH", "DELETE"}
ENTRY_PAGES = {"/", "/docs"}  # what a link on another site may open: the pages, never the API behind them


def allowed_hosts(host, port, extra=()):
    """{(name, port)} this server answers to: the address it is bound to (a loopback or wildcard
    bind: this machine's loopback names), plus each `extra` "name" or "name:port". Port None: any."""
    names = LOOPBACK if host in LOOPBACK or host in WILDCARD else (host,)
    return {(n, port) for n in names} | {host_and_port(e) for e in extra}


def host_and_port(netloc, default_port=None):
    """"Name:port" (or "[v6]:port") -> (lower-case name, port); (None, None) if malformed."""
    try:
        u = urlsplit("//" + netloc)
        return u.hostname, u.port or default_port
    except ValueError:
        return None, None


def is_ours(netloc, hosts, default_port=80):
    name, port = host_and_port(netloc, default_port)
    return (name, port) in hosts or (name, None) in hosts


def guard_site(app, hosts):
    """Refuse what another web page can make the user's browser send: a request whose Host header
    is not one of `hosts` (DNS rebinding: evil.example resolved to 127.0.0.1), and a request from
    another site's page (cross-site request forgery): 403 both. Another site is told by Origin,
    else Referer, else the browser's Sec-Fetch-Site. Reads count too (a GET of step_time runs a
    training probe), except opening ENTRY_PAGES from a link. A request without any of those
    headers (curl, a script) comes from no site: allowed."""

    @app.middleware("http")
    async def same_site_only(request, call_next):
        host = request.headers.get("host", "")
        if not is_ours(host, hosts):
            return JSONResponse({"error": f"this server does not answer to the name {host[:100]!r}; if that is "
                                          f"how you reach it, start it with --allowed-host NAME"}, status_code=403)
        sender = request.headers.get("origin") or request.headers.get("referer")
        guarded = request.method in CHANGES_STATE or request.url.path not in ENTRY_PAGES
        if guarded and from_another_site(sender, request.headers.get("sec-fetch-site"), hosts):
            return JSONResponse({"error": f"refused a cross-site request: a page from {(sender or 'another site')[:100]!r} "
                                          f"may not use this server; use this server's own page"}, status_code=403)
        return await call_next(request)


def from_another_site(sender, fetch_site, hosts):
    """Was the request sent by a page of another site? `sender` is its Origin or Referer URL;
    without one, a browser's Sec-Fetch-Site says (a page may send no Referer, never a wrong one)."""
    if sender is not None:
        u = urlsplit(sender)
        return not is_ours(u.netloc, hosts, {"https": 443}.get(u.scheme, 80))
    return fetch_site in ("cross-site", "same-site")


# ----------------------------------------------------------------------------- command


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
