"""The training job: start one (a full run or a LoRA fine-tune), watch it, stop it, resume it.
One job at a time runs in a background thread (jobs.py); everything it needs is checked before
it starts, so a mistake is a 4xx now instead of a failed job later."""

from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import create_model

from app import runs
from app.web.common import Answer, Azr, Body, settings_fields, settings_from
from azr_trainer import TrainConfig
from files import CorruptFile, Exists, NotFound
from app.jobs import RESUMABLE, Busy
from lora import LoRAConfig
from app.names import check_name

SERVER_CHOOSES = {"device"}  # TrainConfig fields the web API does not offer: the server's device is used

router = APIRouter(tags=["training"])


TrainRequest = create_model(
    "TrainRequest", __base__=Body,
    __doc__="Train `model` on `books` (or one `book`); mode=lora fine-tunes an adapter named `adapter` "
            "(options prefixed lora_) on top of the frozen model.",
    model=(str, ...), book=(str | None, None), books=(list[str], []),
    mode=(Literal["full", "lora"], "full"), adapter=(str | None, None),
    **settings_fields(TrainConfig, skip=SERVER_CHOOSES), **settings_fields(LoRAConfig, prefix="lora_"))


class ResumeRequest(Body):
    """changed_data: go on although a book's text changed since the run started (the lineage says so)."""
    changed_data: bool = False


class Job(Answer):
    """The training job; state is idle, queued, running, done, stopped, failed or interrupted."""
    state: str
    seq: int
    events: list[dict[str, Any]]


@router.post("/train", status_code=202, summary="Start a training job, or a LoRA fine-tune (409 if one is running)",
             response_model=Job)
def train(req: TrainRequest, azr: Azr):
    store, books = azr.store, ([req.book] if req.book else []) + req.books
    tc = settings_from(req, TrainConfig)
    check_training_inputs(store, req.model, books)
    runs.check_fits(store, req.model, tc)
    job = {"kind": req.mode, "model": req.model, "adapter": None, "books": books, "config": asdict(tc),
           "state": "queued", "step": 0, "total": tc.steps}
    if req.mode == "full":
        return azr.jobs.start(job, lambda on_event, should_stop: runs.train(
            store, req.model, books, tc, on_event, should_stop))
    lc = lora_config(store, req)
    job.update(adapter=req.adapter, lora=lc.to_dict())
    return azr.jobs.start(job, lambda on_event, should_stop: runs.finetune(
        store, req.model, books, tc, req.adapter, lc, on_event, should_stop))


@router.get("/training_status", summary="The current job: state, step/total, losses, bits/byte, reward, tokens/s, ETA, log",
            response_model=Job)
def training_status(azr: Azr, since: int = Query(0, ge=0, description="only log events with seq > since")):
    return azr.jobs.status(since)


@router.post("/stop_training", summary="Stop the job after its current step (it saves a checkpoint)")
def stop_training(azr: Azr):
    return azr.jobs.stop()


@router.post("/resume_training", summary="Continue a stopped, interrupted or failed job from its checkpoint, "
                                        "on the books it started with")
def resume_training(azr: Azr, req: ResumeRequest | None = None):
    store, job, changed = azr.store, azr.jobs.status(), req is not None and req.changed_data
    if job["state"] in RESUMABLE:
        check_resumable(store, job["model"], job.get("adapter"), changed)
    return azr.jobs.resume(lambda on_event, should_stop: runs.resume(
        store, job["model"], on_event, should_stop, adapter=job.get("adapter"), changed_data=changed))


def check_training_inputs(store, model, books):
    """Everything a job needs, checked now so the user gets the error instead of a failed job.
    Books must be uploaded books: the web API never reads a path on the server."""
    store.model_dir(model)
    if not books:
        raise ValueError("choose at least one book to train on")
    runs.check_books(books)
    for b in books:
        store.books.info(b)


def lora_config(store, req):
    """The LoRA options of a fine-tune request, checked before the job starts."""
    if not req.adapter:
        raise ValueError("name the adapter to train (mode=lora saves it under the model's adapters)")
    check_name(req.adapter, "adapter")
    if store.tokenizer(req.model) is None:
        raise ValueError(f"model {req.model!r} has no tokenizer yet: train it on a book before fine-tuning it")
    if req.adapter in store.adapters.list(req.model):
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
