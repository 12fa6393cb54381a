"""Generation: continue a prompt (the whole text at once, or one Server-Sent Event per token),
the attention weights over a prompt, and the arena (two models, one prompt and seed, side by
side). Every generation runs on the generation queue's threads (generation_queue.py) and stops
once its client has left."""

import logging
import secrets
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import Field, create_model

from app import inside
from app import runs
from app.web.common import MAX_PROMPT_CHARS, Answer, Azr, Body, GenerationSlot, errors, settings_fields, settings_from
from app.web.generation_queue import GENERATION_THREADS, until
from generate import SamplingConfig, joined, stream

ARENA_MAX_WINDOWS = 256

log = logging.getLogger("azr.server")
router = APIRouter(tags=["generation"])


# ----------------------------------------------------------------------------- schemas

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


class Generated(Answer):
    text: str
    seconds: float


# ----------------------------------------------------------------------------- handlers


@router.post("/generate", summary="Continue a prompt; the whole text at once (429 when too many wait)",
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


@router.post("/generate_stream", summary="Continue a prompt as Server-Sent Events, one per token",
             response_class=EventSourceResponse,
             responses={200: {"description": "data: {text, token, prob, top: [[text, prob] x5]} per token, then "
                                             "event: done with {tokens, seconds, first_token_s}; `: ping` "
                                             "comments keep an idle connection open"}, **errors(429)})
async def generate_stream(args: Annotated[tuple, Depends(stream_request)], azr: Azr, _: GenerationSlot):
    """FastAPI frames each yielded event (fastapi.sse) and sends a keep-alive ping when none
    comes for 15 s, e.g. while a long prompt is read. Each token is made on a generation thread;
    when the client leaves, FastAPI stops asking for the next one."""
    async for event in azr.generation.each(sse_tokens(*args)):
        yield event


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


@router.post("/attention", summary="Attention weights (T x T) of one layer/head over the prompt")
def attention(req: AttentionRequest, azr: Azr):
    model, tok = azr.models.get(req.model, req.adapter)
    torch.set_num_threads(GENERATION_THREADS)
    return inside.attention_map(model, tok, req.prompt, req.layer, req.head)


@router.post("/arena", summary="Two models, one prompt and seed, side by side (+ bits/byte on a book)",
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
        azr.store.books.info(req.book)
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
