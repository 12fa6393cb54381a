"""What every router shares: the app's state (App, reached by a handler as `azr: Azr`), the base
classes of request and answer bodies, the error schema, the limits of a request, and the bridge
from a settings dataclass to a request body and back (settings_fields, settings_from)."""

from dataclasses import fields
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field

import config
from app.web.downloads import sweep_downloads
from app.web.generation_queue import GenerationQueue
from app.web.model_cache import ModelCache
from hardware import pick_device
from app.jobs import JobRunner
from app.store import Store, sweep_temp_files

MAX_UPLOAD_MB = 50
MAX_PROMPT_CHARS = 100_000  # the model sees at most max_seq_len tokens of it anyway
MAX_ERROR_CHARS = 2000  # an error message is cut here: it never sends a huge request back
# every request body but an upload: the longest prompt, each character escaped (\\uXXXX), fits
MAX_JSON_BYTES = 6 * MAX_PROMPT_CHARS + 2**16


# ----------------------------------------------------------------------------- the app's state


class App:
    """What the handlers share: the store, the job runner, the model cache, the generation queue,
    the device, the limits, the API key of /v1 (None: none)."""

    def __init__(self, home, max_upload_mb, api_key=None):
        self.store = Store(home)
        sweep_temp_files(self.store.home)  # left by a kill -9 of the last server, or of a CLI run
        sweep_downloads()
        self.jobs = JobRunner(self.store)
        self.device = pick_device("auto")
        self.models = ModelCache(self.store, self.device)
        self.generation = GenerationQueue()
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.api_key = api_key


def app_of(request: Request) -> App:
    return request.app.state.azr


Azr = Annotated[App, Depends(app_of)]


async def generation_slot(azr: Azr):
    """A slot in the generation queue for the whole request (a stream: until its last event)."""
    with azr.generation.slot():
        yield


GenerationSlot = Annotated[None, Depends(generation_slot)]


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


def settings_from(req, cls, prefix=""):
    """The dataclass `cls` from the matching fields of a request body, validated."""
    return config.build(cls, {f.name: getattr(req, prefix + f.name) for f in fields(cls) if hasattr(req, prefix + f.name)},
                        prefix)


# ----------------------------------------------------------------------------- answers
# The main answers, as the schema shows them; extra="allow" so that documenting a field never drops one.


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ErrorBody(Answer):
    """Every error: what went wrong and what to do; `field` names the form field to blame, if one is."""
    error: str
    field: str | None = None


class Damaged(Answer):
    """A model, book or adapter whose files cannot be read: its name, what is wrong and what to do."""
    name: str
    damaged: str


ERRORS = {400: "a value we cannot use", 404: "unknown model, book, version or adapter",
          409: "name taken, a job already running, or nothing to stop or resume",
          413: "upload over the limit (--max-upload-mb), or a request body over MAX_JSON_BYTES",
          422: "a malformed request: wrong type, unknown field",
          429: "too many generations running or waiting: try again after Retry-After seconds",
          500: "a bug or a damaged file on disk; the server keeps running"}


def errors(*codes):
    return {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}
