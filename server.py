"""The web app: create a model, upload books, train, watch, generate, compare and download it.

    python server.py                      # http://127.0.0.1:8000, data in $AZR_HOME or here
    python server.py --port 8080 --home ~/azr --max-upload-mb 200

A thin JSON API over the same functions the CLI calls (store.Store, azr_trainer, model.stream,
lora), plus one page (templates/index.html + static/app.js) that uses exactly this API; FastAPI
documents every endpoint at /docs. Three pieces hold the state that outlives one request:

- JobRunner (jobs.py): the one training job, in a background thread, persisted under jobs/.
- ModelCache: each model (or model + LoRA adapter) is loaded once for generation and reloaded
  when its files change on disk (a finished run, a rollback), so generating stays fast and never
  shows stale weights.
- The store: everything else is files, read on every request.

Errors a user can cause become 4xx JSON {"error": "..."}; anything else becomes a 500 with the
same shape, and the server keeps running.
"""

import argparse
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

import azr_trainer
import lora
from hardware import pick_device
from jobs import RESUMABLE, Busy, JobRunner
from model import LIMITS, PRESETS, ModelConfig, SamplingConfig, flops_per_token, generate, memory_estimate, param_count, stream
from store import CorruptFile, Exists, NotFound, Store, check_name, read_json
from tokenizer import prepare_tokens

ROOT = Path(__file__).resolve().parent
MAX_UPLOAD_MB = 50
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "lineage.json", "metrics.jsonl")
MAX_PROMPT_CHARS = 100_000  # the model sees at most max_seq_len tokens of it anyway
ATTENTION_MAX_TOKENS = 64  # a 64x64 heatmap is still readable; longer prompts keep their end
ARENA_MAX_WINDOWS = 256
# Generation runs on one CPU thread. Decoding one token is a chain of small matrix-vector products
# where handing work between OpenMP threads costs more than it saves, and when a training job
# keeps the cores busy the threads stall waiting for each other (measured on 2 busy cores: 50
# tokens of the small preset in 27 ms on 1 thread, 241 ms on 2). With torch's OpenMP backend the
# setting is per thread, so the training thread keeps all of its threads.
GENERATION_THREADS = 1
TRAIN_FIELDS = {"batch_size", "learning_rate", "seq_len", "warmup_steps", "eval_every", "checkpoint_every",
                "selfplay_every", "grad_accum", "seed", "compile"}  # TrainRequest fields passed to TrainConfig as they are

log = logging.getLogger("azr.server")


# ----------------------------------------------------------------------------- request bodies


class Body(BaseModel):
    # a misspelt option is an error, not silently ignored; "model_*" field names are ours
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CreateModelRequest(Body):
    """A preset, or the six numbers; numbers given next to a preset override it."""
    name: str
    preset: Literal["small", "medium", "large"] | None = None
    vocab_size: int | None = None
    d_model: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int | None = None
    dropout: float | None = None
    seed: int = 0


class TrainRequest(Body):
    """Train `model` on `books` (or one `book`) for `iterations` optimizer steps. Options left out
    take azr_trainer.TrainConfig's defaults. selfplay_every=N adds a self-play step every N steps."""
    model: str
    book: str | None = None
    books: list[str] = []
    iterations: int = 1000
    batch_size: int | None = None
    learning_rate: float | None = None
    seq_len: int | None = None
    warmup_steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    selfplay_every: int | None = None
    grad_accum: int | None = None
    seed: int | None = None
    compile: Literal["auto", "on", "off"] | None = None
    # mode="lora": fine-tune a LoRA adapter named `adapter` on top of the frozen model (lora.py)
    mode: Literal["full", "lora"] = "full"
    adapter: str | None = None
    r: int = lora.LoRAConfig.r
    alpha: float = lora.LoRAConfig.alpha
    targets: list[str] = list(lora.LoRAConfig.targets)
    nf4: bool = False


class SamplingRequest(Body):
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | None = None


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
    windows: int = 64


class RollbackRequest(Body):
    version: str


class MergeRequest(Body):
    """A new model `out`: `model` with its LoRA `adapter` merged into the weights."""
    model: str
    adapter: str
    out: str


# ----------------------------------------------------------------------------- the app


def create_app(home=None, max_upload_mb=MAX_UPLOAD_MB):
    """A new app over the store at `home`. Tests build several on one home to mimic restarts."""
    store = Store(home)
    jobs = JobRunner(store)
    device = pick_device("auto")
    models = ModelCache(store, device)
    max_upload_bytes = int(max_upload_mb * 2**20)
    templates = Jinja2Templates(directory=ROOT / "templates")

    app = FastAPI(title="AZR Model Trainer", version="1.0",
                  description="Train small GPTs on books. Errors are JSON: {\"error\": \"...\"}.")
    app.state.store, app.state.jobs, app.state.models = store, jobs, models
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    add_error_handlers(app, max_upload_bytes)

    # -- page and health ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index(request: Request):
        return templates.TemplateResponse(request, "index.html", {
            "presets": {k: v.to_dict() for k, v in PRESETS.items()}, "limits": LIMITS,
            "max_upload_bytes": max_upload_bytes, "lora_targets": lora.TARGETS, "lora": lora.LoRAConfig(),
        })

    @app.get("/health", summary="Server is up: device, counts, job state")
    def health():
        return {"ok": True, "device": str(device), "models": len(store.list_models()),
                "books": len(store.list_books()), "job": jobs.status()["state"], "max_upload_bytes": max_upload_bytes}

    # -- models -------------------------------------------------------------------------------
    @app.get("/estimate", summary="Parameter count and training memory of a config (live form check)")
    def estimate(vocab_size: int = 5000, d_model: int = 128, num_layers: int = 4, num_heads: int = 4,
                 d_ff: int = 512, max_seq_len: int = 128, batch_size: int = Query(16, ge=1, le=4096)):
        cfg = ModelConfig(vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_len).validate()
        return {"params": param_count(cfg), "memory": memory_estimate(cfg, batch_size),
                "flops_per_token": flops_per_token(cfg), "batch_size": batch_size}

    @app.post("/create_model", status_code=201, summary="Create a model from a preset or six numbers")
    def create_model(req: CreateModelRequest):
        base = PRESETS[req.preset].to_dict() if req.preset else ModelConfig().to_dict()
        given = req.model_dump(exclude={"name", "preset", "seed"}, exclude_none=True)
        cfg = ModelConfig.from_dict({**base, **given})
        store.create_model(req.name, cfg, seed=req.seed)
        return store.info(req.name)

    @app.get("/models", summary="All models: params, size on disk, steps, best val bits/byte, lineage")
    def list_models():
        return store.list_models()

    @app.get("/models/{name}", summary="One model: info, runs, versions, adapters")
    def model_info(name: str):
        info = store.info(name)
        adapters = [lora.adapter_info(store, name, a) for a in info["adapters"]]
        return {**info, "adapters": adapters, "runs": store.lineage(name)["runs"], "training": jobs.is_active(name)}

    @app.get("/models/{name}/metrics", summary="Rows of metrics.jsonl from line `since`, optionally one run or adapter")
    def model_metrics(name: str, since: int = Query(0, ge=0), run: str | None = None, adapter: str | None = None):
        rows = store.metrics(name, since, adapter)
        # a resume rewrites the file without the steps it redoes, so `since` can point past its end:
        # then the client starts over from line 0
        reset = not rows and since > 0 and len(store.metrics(name, 0, adapter)) < since
        if reset:
            rows = store.metrics(name, 0, adapter)
        return {"rows": [r for r in rows if run is None or r.get("run") == run],
                "next": (0 if reset else since) + len(rows), "reset": reset}

    @app.delete("/models/{name}", summary="Delete a model, its versions and checkpoints")
    def delete_model(name: str):
        refuse_while_training(jobs, name, "delete")
        store.delete_model(name)
        models.forget(name)
        return {"deleted": name}

    @app.delete("/models/{name}/adapters/{adapter}", summary="Delete one LoRA adapter of a model")
    def delete_adapter(name: str, adapter: str):
        refuse_while_training(jobs, name, "delete an adapter of")
        store.delete_adapter(name, adapter)
        models.forget(name)
        return {"deleted": adapter, "model": name}

    @app.post("/models/{name}/rollback", summary="Make a saved version the current weights")
    def rollback(name: str, req: RollbackRequest):
        refuse_while_training(jobs, name, "roll back")
        store.rollback(name, req.version)
        return store.info(name)

    @app.post("/merge", status_code=201, summary="Merge a LoRA adapter into a new model")
    def merge(req: MergeRequest):
        lora.merge_adapter(store, req.model, req.adapter, req.out)
        return store.info(req.out)

    @app.get("/download_model/{name}", summary="A zip of the model: weights, config, tokenizer, lineage, metrics, README")
    def download_model(name: str):
        path = build_model_zip(store, name)
        return FileResponse(path, media_type="application/zip", filename=f"{name}.zip",
                            background=BackgroundTask(os.unlink, path))

    # -- books --------------------------------------------------------------------------------
    # max_body_size counts the bytes as they arrive: a chunked upload (no Content-Length) is cut off
    # at the limit instead of being spooled to a temp file in full before read_upload sees it
    @app.post("/upload_book", status_code=201, summary="Upload a .txt (any encoding), .fb2 or .epub book",
              max_body_size=max_upload_bytes + 2**16)  # + room for the multipart headers
    def upload_book(file: UploadFile = File(...), name: str | None = Form(None)):
        data = read_upload(file, max_upload_bytes)
        name = name or book_name_from(file.filename)
        info = store.add_book(check_name(name, "book"), data, file.filename or "book.txt")
        return {**info, "preview": preview(store.book_text(name))}

    @app.get("/books", summary="Uploaded books with size, encoding and language")
    def list_books():
        return store.list_books()

    @app.get("/books/{name}", summary="One book's info and the first lines of its text")
    def book_info(name: str):
        return {**store.book_info(name), "preview": preview(store.book_text(name))}

    @app.delete("/books/{name}", summary="Delete a book")
    def delete_book(name: str):
        store.delete_book(name)
        return {"deleted": name}

    # -- training -----------------------------------------------------------------------------
    @app.post("/train", status_code=202, summary="Start a training job, or a LoRA fine-tune (409 if one is running)")
    def train(req: TrainRequest):
        books = ([req.book] if req.book else []) + req.books
        tc = train_config(req)
        check_training_inputs(store, req.model, books)
        fields = {"kind": req.mode, "model": req.model, "adapter": None, "books": books, "config": asdict(tc),
                  "state": "queued", "step": 0, "total": tc.steps}
        if req.mode == "full":
            return jobs.start(fields, lambda on_event, should_stop: azr_trainer.train(
                store, req.model, books, tc, on_event, should_stop))
        lc = lora_config(store, req)
        fields.update(adapter=req.adapter, lora=lc.to_dict())
        return jobs.start(fields, lambda on_event, should_stop: azr_trainer.finetune(
            store, req.model, books, tc, req.adapter, lc, on_event, should_stop))

    @app.get("/training_status", summary="The current job: state, step/total, losses, bits/byte, reward, tokens/s, ETA, log")
    def training_status(since: int = Query(0, ge=0, description="only log events with seq > since")):
        return jobs.status(since)

    @app.post("/stop_training", summary="Stop the job after its current step (it saves a checkpoint)")
    def stop_training():
        return jobs.stop()

    @app.post("/resume_training", summary="Continue a stopped, interrupted or failed job from its checkpoint")
    def resume_training():
        job = jobs.status()
        if job["state"] in RESUMABLE:
            check_resumable(store, job["model"], job.get("adapter"))
        return jobs.resume(lambda on_event, should_stop: azr_trainer.resume(
            store, job["model"], on_event, should_stop, adapter=job.get("adapter")))

    # -- generation -------------------------------------------------------------------------
    @app.post("/generate", summary="Continue a prompt; the whole text at once")
    def generate_text(req: GenerateRequest):
        model, tok = models.get(req.model, req.adapter)
        sc = sampling_config(req)
        torch.set_num_threads(GENERATION_THREADS)
        t0 = time.perf_counter()
        text = generate(model, tok, req.prompt, sc, device)
        return {"text": text, "seconds": round(time.perf_counter() - t0, 3)}

    @app.post("/generate_stream", summary="Continue a prompt as Server-Sent Events, one per token",
              response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "data: {text, token, prob, top: [[text, prob] x5]} per token, "
                                              "then event: done with {tokens, seconds, first_token_s}"}})
    def generate_stream(req: GenerateRequest):
        model, tok = models.get(req.model, req.adapter)  # errors here are still plain 4xx JSON
        sc = sampling_config(req)
        return StreamingResponse(sse_tokens(model, tok, req.prompt, sc, device), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/attention", summary="Attention weights (T x T) of one layer/head over the prompt")
    def attention(req: AttentionRequest):
        model, tok = models.get(req.model, req.adapter)
        torch.set_num_threads(GENERATION_THREADS)
        return attention_map(model, tok, req.prompt, req.layer, req.head, device)

    @app.post("/arena", summary="Two models, one prompt and seed, side by side (+ bits/byte on a book)")
    def arena(req: ArenaRequest):
        sc = sampling_config(req)
        if sc.seed is None:  # both sides draw the same random numbers: a fair comparison
            sc.seed = secrets.randbelow(2**31)  # not torch's generator: training re-seeds it
        if not 1 <= req.windows <= ARENA_MAX_WINDOWS:
            raise ValueError(f"windows must be between 1 and {ARENA_MAX_WINDOWS}")
        if req.book:
            store.book_info(req.book)
        torch.set_num_threads(GENERATION_THREADS)
        sides = {}
        for side, name, adapter in (("a", req.model_a, req.adapter_a), ("b", req.model_b, req.adapter_b)):
            model, tok = models.get(name, adapter)
            sides[side] = {"model": name, "adapter": adapter, "text": generate(model, tok, req.prompt, sc, device)}
            if req.book:
                sides[side]["bits_per_byte"] = book_bpb(store, model, tok, req.book, req.windows, device)
        return {**sides, "seed": sc.seed, "book": req.book}

    return app


# ----------------------------------------------------------------------------- errors


def add_error_handlers(app, max_upload_bytes):
    """Every error leaves as {"error": message} with a status that says whose fault it was."""

    @app.exception_handler(RequestValidationError)
    async def bad_request_shape(request, exc):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        body = {"error": f"{field}: {first['msg']}" if field else first["msg"]}
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = too_big(max_upload_bytes) if exc.status_code == 413 else str(exc.detail)
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    async def known_error(request, exc):
        body = {"error": str(exc)}
        field = config_field(str(exc)) if isinstance(exc, ValueError) else None
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=error_status(exc))

    async def unexpected_error(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}): {exc}"}, status_code=500)

    # ValueError covers StoreError, BookError and every config/sampling check
    for cls in (ValueError, Busy):
        app.add_exception_handler(cls, known_error)
    app.add_exception_handler(Exception, unexpected_error)

    @app.middleware("http")
    async def refuse_big_uploads(request, call_next):
        """Refuse an oversized upload from its Content-Length, before reading the body."""
        length = request.headers.get("content-length", "")
        if request.url.path == "/upload_book" and length.isdigit() and int(length) > max_upload_bytes + 2**16:
            return JSONResponse({"error": too_big(max_upload_bytes)}, status_code=413)
        return await call_next(request)


class TooLarge(ValueError):
    pass


def error_status(exc):
    """Whose fault: 404/409/413/400 for the user's, 500 for a damaged file on our disk."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Exists, Busy)):
        return 409
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, CorruptFile):
        return 500
    return 400


def config_field(message):
    """The field to change, so the page can mark it: the one the message suggests ("try
    num_heads in ..."), else the one it starts with ("d_model must be between ...")."""
    m = re.search(r"\btry (\w+)", message) or re.match(r"(\w+) ", message)
    return m.group(1) if m and m.group(1) in {*LIMITS, "dropout", "iterations", *TRAIN_FIELDS} else None


def too_big(max_upload_bytes):
    return f"the file is larger than the upload limit of {max_upload_bytes / 2**20:.0f} MB (server option --max-upload-mb)"


# ----------------------------------------------------------------------------- helpers


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
        tok = self.store.tokenizer(name)
        if tok is None:
            raise HTTPException(409, f"model {name!r} has no tokenizer yet: train it on a book first")
        if adapter:
            model = lora.load_adapter(self.store, name, adapter, self.device)
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


def file_key(path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def sampling_config(req):
    return SamplingConfig(req.max_tokens, req.temperature, req.top_k, req.top_p, req.repetition_penalty,
                          req.seed, req.stop or None).validate()


def sse_tokens(model, tok, prompt, sc, device):
    """Server-Sent Events: one `data:` line of JSON per token, then `event: done` (or `error`)."""
    t0, first, n = time.perf_counter(), None, 0
    try:
        torch.set_num_threads(GENERATION_THREADS)
        for piece in stream(model, tok, prompt, sc, device):
            first = first or time.perf_counter() - t0
            n += 1
            yield f"data: {json.dumps(piece)}\n\n"
            torch.set_num_threads(GENERATION_THREADS)  # resumed on any worker thread: set it there too
        done = {"tokens": n, "seconds": round(time.perf_counter() - t0, 4), "first_token_s": round(first or 0, 4)}
        yield f"event: done\ndata: {json.dumps(done)}\n\n"
    except Exception as e:  # the 200 header is gone: report the error in the stream itself
        log.exception("generation failed")
        yield f"event: error\ndata: {json.dumps({'error': str(e)})}\n\n"


@torch.no_grad()
def attention_map(model, tok, prompt, layer, head, device):
    cfg = model.config
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer must be between 0 and {cfg.num_layers - 1}")
    if head is not None and not 0 <= head < cfg.num_heads:
        raise ValueError(f"head must be between 0 and {cfg.num_heads - 1} (or null for the mean of all heads)")
    ids = tok.encode(prompt)[-min(ATTENTION_MAX_TOKENS, cfg.max_seq_len):]
    if not ids:
        raise ValueError("type a prompt first: attention needs at least one token")
    _, _, atts = model(torch.tensor([ids], device=device), explain=True)
    att = atts[layer][0]  # (nh, T, T)
    att = att.mean(0) if head is None else att[head]  # (T, T)
    return {"tokens": [tok.decode([i]) for i in ids], "layer": layer, "head": head,
            "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "attention": [[round(v, 4) for v in row] for row in att.tolist()]}


def book_bpb(store, model, tok, book, windows, device):
    """Bits/byte of `model` on the validation split of `book`, cut with the model's own tokenizer."""
    data = prepare_tokens(tok, {book: store.book_text(book)}, store.home / "cache" / "tokens")
    T = min(model.config.max_seq_len, len(data["val"]) - 1)
    if T < 8:
        raise ValueError(f"book {book!r} is too short to score: its validation split has {len(data['val'])} tokens")
    byte_len = torch.from_numpy(tok.byte_lengths())
    return azr_trainer.evaluate_bpb(model, data["val"], byte_len, T, windows, device)["val_bpb"]


def train_config(req):
    opts = req.model_dump(include=TRAIN_FIELDS, exclude_none=True)
    try:
        return azr_trainer.TrainConfig.from_dict({"steps": req.iterations, **opts})
    except ValueError as e:  # the API calls the trainer's `steps` "iterations"
        raise ValueError(re.sub(r"^steps ", "iterations ", str(e))) from None


def check_training_inputs(store, model, books):
    """Everything a job needs, checked now so the user gets the error instead of a failed job.
    Books must be uploaded books: the web API never reads a path on the server."""
    store.model_dir(model)
    if not books:
        raise ValueError("choose at least one book to train on")
    for b in books:
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
    return lora.LoRAConfig(r=req.r, alpha=req.alpha, targets=tuple(req.targets), nf4=req.nf4).validate()


def check_resumable(store, model, adapter=None):
    store.model_dir(model)
    run = azr_trainer.run_dir(store, model, adapter) / "run.json"
    if not run.exists():
        raise Busy(f"model {model!r} has no checkpointed run to resume (it failed before its first step); "
                   "start a new training run instead")
    if read_json(run)["status"] == "done":
        raise Busy(f"the last run of {model!r} already finished; start a new one")


def refuse_while_training(jobs, name, what):
    if jobs.is_active(name):
        raise Busy(f"cannot {what} model {name!r} while it is training; stop the job first")


def read_upload(file, max_upload_bytes):
    """The uploaded bytes, refusing more than the limit (Content-Length may be missing or lie)."""
    chunks, total = [], 0
    while chunk := file.file.read(2**20):
        total += len(chunk)
        if total > max_upload_bytes:
            raise TooLarge(too_big(max_upload_bytes))
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
    from model import GPT, ModelConfig, SamplingConfig, generate
    from store import load_tensors, load_weights
    from tokenizer import Tokenizer

    cfg = ModelConfig.from_dict(json.load(open("{name}/config.json")))
    model = GPT(cfg)
    tensors, meta = load_tensors("{name}/model.safetensors")  # checks the sha256 too
    load_weights(model, tensors)
    tok = Tokenizer.load("{name}/tokenizer.json")
    print(generate(model, tok, "Once upon a time", SamplingConfig(max_new_tokens=100)))

Or put it back into a data folder: copy {name}/ to <AZR_HOME>/models/{name}/ and run
`python cli.py generate {name} --prompt "..."` or `python server.py`.
"""


def build_model_zip(store, name):
    """Zip the named model's files (only those) into a temp file; the caller deletes it."""
    d = store.model_dir(name)
    info = store.info(name)
    fd, path = tempfile.mkstemp(prefix=f"azr-{name}-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for fname in MODEL_FILES:
                if (d / fname).exists():
                    z.write(d / fname, f"{name}/{fname}")
            z.writestr(f"{name}/README.txt", README_TXT.format(name=name, params=info["params"], steps=info["steps"]))
    except BaseException:
        os.unlink(path)
        raise
    return path


# ----------------------------------------------------------------------------- command


def main(argv=None):
    p = argparse.ArgumentParser(description="AZR Model Trainer web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--home", help="data folder (default: $AZR_HOME or the project folder)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest book upload, in MB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args.home, args.max_upload_mb)
    print(f"AZR Model Trainer: http://{args.host}:{args.port}  (data in {app.state.store.home})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
