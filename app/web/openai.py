"""OpenAI's HTTP API over our models, so the tools that already speak it (the `openai` client, chat
UIs, editors) can talk to a book model: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

This router only translates. A request in OpenAI's shape becomes what /generate gets — the server's
model cache, SamplingConfig and its checks, `generate.stream`, a slot in the same generation queue
(429 with Retry-After when it is full; the work stops once the client leaves) — and the tokens come
back in OpenAI's shape, whole or as Server-Sent Events ending with `data: [DONE]`.

- **Model ids**: `name` for a model, `name:adapter` for it with one of its LoRA adapters.
  /v1/models lists the ones that can generate: trained models and the adapters that fit their
  current weights.
- **Sampling**: `max_tokens` is SamplingConfig's max_new_tokens; temperature, top_p, seed keep
  their meaning, and our top_k and repetition_penalty are accepted as well. A field left out
  takes SamplingConfig's default. `stop` takes up to 4 strings, cut from the text as OpenAI does.
  n is 1. Fields of OpenAI's API this server does not know are ignored.
- **Chat**: these are book models, not chat models. The chat endpoint writes the conversation as
  a plain script ("User: ..." / "Assistant: ...") and the model continues the assistant's line
  until it starts the user's next one; expect the book's style, not answers.
- **Errors** keep the server's messages and statuses in OpenAI's shape
  {"error": {"message", "type", "param", "code"}}; a malformed body is 400 there, not 422.
- **Who may ask**: the server's site guard applies to /v1 as to every request. Without an API key
  (`server.py --api-key`, or $AZR_API_KEY) /v1 answers only this machine; with one, any client that
  sends `Authorization: Bearer <key>`.
"""

import hmac
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import fields
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

import config
from app.web.common import MAX_PROMPT_CHARS, Azr, GenerationSlot, errors
from app.web.generation_queue import until
from config import SettingError
from files import NotFound
from generate import SamplingConfig, stream
from app.names import check_name

OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingConfig's name -> OpenAI's, where they differ
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 200  # a stop string is a few words; each new piece of text is checked against its prefixes
SPEAKERS = {"user": "User", "assistant": "Assistant"}  # system and developer messages are plain text
CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}

log = logging.getLogger("azr.openai")


class BadParam(ValueError):
    """A value of the request we cannot use, and the request field to blame."""

    def __init__(self, message, param):
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------- errors and access


class OpenAIRoute(APIRoute):
    """A route whose errors leave in OpenAI's shape. The app's own exception handler makes the
    answer (the same status and message as anywhere else in the API); this only reshapes it."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handler(request):
            try:
                return await handle(request)
            except Exception as exc:
                return openai_error(await app_answer(request, exc), getattr(exc, "param", None))
        return handler


async def app_answer(request, exc):
    """What the app's exception handler for `exc` (or its nearest base class) answers."""
    handlers = request.app.exception_handlers
    handle = next(handlers[cls] for cls in type(exc).__mro__ if cls in handlers)
    return await handle(request, exc)


def openai_error(answer, param=None):
    """{"error": message, "field": ...} with its status -> OpenAI's {"error": {...}}, keeping the
    headers that say what to do next (Retry-After, WWW-Authenticate)."""
    said, status = json.loads(answer.body), 400 if answer.status_code == 422 else answer.status_code
    body = {"message": said["error"], "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": param or said.get("field"), "code": CODES.get(status)}
    headers = {k: v for k, v in answer.headers.items() if k in ("retry-after", "www-authenticate")}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def check_access(request: Request):
    """With an API key: the request must carry it. Without one: only this machine may ask."""
    key = request.app.state.azr.api_key
    if key is None:
        if not from_this_machine(request):
            raise HTTPException(403, "the OpenAI-compatible API answers other machines only with an API key: "
                                     "start the server with --api-key KEY (or $AZR_API_KEY) and send it as a Bearer token")
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess: the time leaks nothing
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), key.encode()):
        raise HTTPException(401, "a wrong or missing API key: send the server's key as 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})


def from_this_machine(request):
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:  # not an address at all
        return False
    # a dual-stack socket (--host ::) shows 127.0.0.1 as ::ffff:127.0.0.1
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=OpenAIRoute,
                   dependencies=[Depends(check_access)])


# ----------------------------------------------------------------------------- request bodies


class OpenAIBody(BaseModel):
    # OpenAI's clients send fields we have no use for (user, logprobs: null, ...): ignored, not refused
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())


def sampling_fields():
    """SamplingConfig's fields under OpenAI's names, each optional (left out: SamplingConfig's
    default). `stop` is OpenAI's own: up to 4 strings."""
    return {OPENAI_NAMES.get(f.name, f.name): (config.field_type(SamplingConfig, f)[0] | None,
                                               Field(None, description=f.metadata["help"]))
            for f in fields(SamplingConfig) if f.name != "stop"}


ASKED = dict(model=(str, Field(description="`name` or `name:adapter`, as /v1/models lists them")),
             stop=(str | list[str] | None, None), n=(int, 1), stream=(bool, False))

CompletionRequest = create_model("CompletionRequest", __base__=OpenAIBody, **ASKED, prompt=(str | list[str], ""),
                                 **sampling_fields())


class TextPart(OpenAIBody):
    type: Literal["text"]
    text: str


class Message(OpenAIBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


ChatRequest = create_model("ChatRequest", __base__=OpenAIBody, **ASKED, messages=(list[Message], ...),
                           max_completion_tokens=(int | None, Field(None, description="the same as max_tokens")),
                           **sampling_fields())


# ----------------------------------------------------------------------------- endpoints


@router.get("/models", summary="Every model and adapter that can generate, as OpenAI model objects")
def list_models(azr: Azr):
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "azr"}
                                       for i, created in generating_models(azr.store)]}


@router.post("/completions", summary="Continue a prompt (OpenAI's completions API); stream: true for SSE",
             responses=errors(429))
async def completions(req: CompletionRequest, request: Request, azr: Azr, _: GenerationSlot):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise BadParam("send one prompt: this server continues one text per request", "prompt")
    return await answer(request, azr, req, prompts[0], stops_of(req.stop), text_completion, text_chunks)


@router.post("/chat/completions", summary="Continue a conversation written as a plain script (a book model, "
                                          "not a chat model); stream: true for SSE", responses=errors(429))
async def chat_completions(req: ChatRequest, request: Request, azr: Azr, _: GenerationSlot):
    if req.max_completion_tokens is not None:
        req.max_tokens = req.max_completion_tokens
    stops = stops_of(req.stop) + ["\nUser:"]
    return await answer(request, azr, req, chat_prompt(req.messages), stops, chat_completion, chat_chunks)


async def answer(request, azr, req, prompt, stops, whole, chunks):
    """The continuation of `prompt`, loaded and checked before the answer starts (an error is still
    a plain 4xx), then made on the generation queue's threads: whole(job, text) at once, or
    chunks(job) as Server-Sent Events. Either way it stops once the client has left."""
    job = await run_in_threadpool(Continuation, azr, req, prompt, stops)
    if req.stream:
        return EventSourceResponse(azr.generation.each(sse(chunks(job))))
    return await azr.generation.run(request, whole_until, job, whole)


def whole_until(cancelled, job, whole):
    """The whole continuation, on a generation thread; Abandoned once `cancelled` is set."""
    return whole(job, "".join(until(cancelled, job)))


# ----------------------------------------------------------------------------- the continuation


class Continuation:
    """One request's continuation, checked and loaded before the answer starts (so an error is
    still a plain 4xx). Iterate it for the text, cut before the first stop string; afterwards
    `finish_reason` and `tokens` say why it ended and how many tokens it took."""

    def __init__(self, azr, req, prompt, stops):
        if req.n != 1:
            raise BadParam("n must be 1: this server writes one continuation per request", "n")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadParam(f"the prompt is longer than {MAX_PROMPT_CHARS:,} characters", "prompt")
        self.sc, self.stops, self.prompt, self.device = sampling_config(req), stops, prompt, azr.device
        self.model, self.tok = load(azr, req.model)
        self.id, self.model_id, self.created = secrets.token_hex(12), req.model, int(time.time())
        self.finish_reason, self.tokens = None, 0

    def __iter__(self):
        held = ""  # text that may be the start of a stop string: not sent until we know
        for piece, token, _ in stream(self.model, self.tok, self.prompt, self.sc, self.device):
            self.tokens += token is not None
            held += piece
            cut = first_stop(held, self.stops)
            if cut is not None:
                self.finish_reason = "stop"
                yield held[:cut]
                return
            ready = len(held) - stop_prefix_len(held, self.stops)
            yield held[:ready]
            held = held[ready:]
        self.finish_reason = "length" if self.tokens == self.sc.max_new_tokens else "stop"  # else <|endoftext|>
        yield held

    def usage(self):
        prompt_tokens = len(self.tok.encode(self.prompt))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": prompt_tokens + self.tokens}


def load(azr, model_id):
    """-> (model, tokenizer) for `name` or `name:adapter`; an id that cannot name one is unknown (404)."""
    name, _, adapter = model_id.partition(":")
    try:
        check_name(name)
        if adapter:
            check_name(adapter, "adapter")
    except ValueError:
        raise NotFound(f"no model {model_id[:100]!r}: use an id from the model list (name or name:adapter)") from None
    return azr.models.get(name, adapter or None)


def sampling_config(req):
    """SamplingConfig from the request's OpenAI names, checked by SamplingConfig's own rules."""
    given = {f.name: getattr(req, OPENAI_NAMES.get(f.name, f.name)) for f in fields(SamplingConfig) if f.name != "stop"}
    try:
        return config.build(SamplingConfig, {k: v for k, v in given.items() if v is not None})
    except SettingError as e:  # its message starts with the field's name: say it the way OpenAI does
        theirs = OPENAI_NAMES.get(e.field, e.field)
        raise BadParam(str(e).replace(e.field, theirs, 1), theirs) from None


def stops_of(stop):
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadParam(f"stop takes up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters", "stop")
    return stops


def first_stop(text, stops):
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_len(text, stops):
    """The length of the longest end of `text` that begins a stop string: held back until the
    next piece says whether the stop string follows."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


def chat_prompt(messages):
    """The conversation as a script the book model continues: system text as it is, then one
    "User: ..." or "Assistant: ..." line per message, and "Assistant:" for the model to complete."""
    lines = []
    for m in messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        lines.append(f"{SPEAKERS[m.role]}: {text}" if m.role in SPEAKERS else text)
    return "\n".join(lines) + "\nAssistant:"


def generating_models(store):
    """(id, created) of every model that can generate — trained, files readable — and of each of
    its adapters that fits its current weights (an adapter is refused on any others)."""
    for m in store.list_models():
        if "damaged" in m or not m["has_tokenizer"]:
            continue
        yield m["name"], epoch(m["created"])
        for adapter in m["adapters"]:
            try:
                info = store.adapters.info(m["name"], adapter)
                store.adapters.check_base(m["name"], info)
            except (ValueError, OSError, KeyError):  # damaged, or trained on other weights
                continue
            yield f"{m['name']}:{adapter}", epoch(info.get("saved", m["created"]))


def epoch(stamp):
    """The store's local "YYYY-MM-DDTHH:MM:SS" -> Unix seconds, as OpenAI's `created` is."""
    try:
        return int(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")))
    except (TypeError, ValueError):
        return 0


# ----------------------------------------------------------------------------- answers in OpenAI's shape


def text_completion(job, text):
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": job.model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": job.usage()}


def chat_completion(job, text):
    text = text.lstrip()  # the model continues "Assistant:", most often with a space
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": job.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.finish_reason}], "usage": job.usage()}


def text_chunks(job):
    def chunk(text, finish_reason=None):
        return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": job.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    yield from (chunk(piece) for piece in job if piece)
    yield chunk("", job.finish_reason)


def chat_chunks(job):
    def chunk(delta, finish_reason=None):
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                "model": job.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    yield chunk({"role": "assistant", "content": ""})
    started = False
    for piece in job:
        piece = piece if started else piece.lstrip()
        if piece:
            started = True
            yield chunk({"content": piece})
    yield chunk({}, job.finish_reason)


def sse(chunks):
    """Server-Sent Events as OpenAI sends them: one `data:` JSON chunk each, then `data: [DONE]`.
    An error after the 200 header goes into the stream in OpenAI's error shape."""
    try:
        for c in chunks:
            yield format_sse_event(data_str=json.dumps(c))
    except Exception as e:
        log.exception("generation failed")
        error = {"message": f"generation failed ({type(e).__name__}); the server's log says more",
                 "type": "server_error", "param": None, "code": None}
        yield format_sse_event(data_str=json.dumps({"error": error}))
        return
    yield format_sse_event(data_str="[DONE]")
