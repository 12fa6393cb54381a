"""The records read from disk, each checked against its schema before anything uses it.

A JSON file of the right name can hold anything: `[]`, `null`, a hand edit, a number where a
list belongs, a file cut short by an older version. Code that indexes into such a record fails
far from the file — a TypeError deep inside a listing takes the whole listing, or the server's
start, down with it. So every record the store, the runs and the job runner read comes in
through `load(path, Kind)`: parsed, then validated by the pydantic model of its kind, which
names only the fields the code relies on (any others pass through untouched). A settings field
(a model's config, a run's options, a LoRA adapter's) is checked by its own dataclass's rules
(config.py), so those rules stay written once.

Whatever is wrong becomes one error, CorruptFile("<file> is damaged (<what>)"), and each caller
decides what the user sees: a model, book or adapter listed as damaged with what to do about it,
a job file skipped when the server starts. One bad file never takes another object with it.
"""

import time
import uuid
from dataclasses import asdict
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from azr_trainer import TrainConfig
from files import CorruptFile, NotFound, read_json, shown, write_json
from lora import LoRAConfig
from model import ModelConfig

MAX_RECORD_BYTES = 32 * 2**20  # far above any real record: a bigger file is not one, and is not read


def load(path, kind):
    """The record at `path` as a dict, checked against `kind`. NotFound if there is no file;
    CorruptFile, saying what is wrong, if it cannot be read or has the wrong shape."""
    checked = checked_record(path, kind)
    return checked.model_dump(exclude_unset=True) if isinstance(checked, BaseModel) else checked


def checked_record(path, kind):
    """The record at `path` checked against `kind`, as `kind` gives it back (load's errors)."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, more than any record holds")
        checked = TypeAdapter(kind).validate_python(read_json(path))
    except FileNotFoundError:
        raise NotFound(f"{shown(path)} not found") from None
    except ValidationError as e:
        raise CorruptFile(f"{shown(path)} is damaged ({first_problem(e)})") from None
    except OSError as e:  # a folder where the file belongs, no permission
        raise CorruptFile(f"{shown(path)} is damaged ({e.strerror or type(e).__name__})") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past reason
        raise CorruptFile(f"{shown(path)} is damaged ({str(e)[:200] or type(e).__name__})") from None
    return checked


def first_problem(e):
    """A pydantic error in one line: where and what, and how many more."""
    err = e.errors()[0]
    where = ".".join(map(str, err["loc"])) or "the file"
    msg = "Input should be a JSON object" if err["type"] in ("model_type", "dict_type") else err["msg"]
    more = f"; and {e.error_count() - 1} more" if e.error_count() > 1 else ""
    return f"{where}: {msg}{more}"[:300]


def settings(cls):
    """A settings dataclass stored as a JSON object, held to the dataclass's own rules."""
    def check(d):
        cls.from_dict(d)
        return d
    return Annotated[dict[str, Any], AfterValidator(check)]


class Record(BaseModel):
    # fields not named here pass through; a JSON string is not a number, true is not 1
    model_config = ConfigDict(extra="allow", strict=True)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

ModelConfigFile = settings(ModelConfig)  # models/<name>/config.json


class BookRef(Record):
    name: str
    sha256: Sha256


class Version(Record):
    version: str = Field(pattern=r"^v\d+$")
    date: str
    steps: int
    best_val_bpb: float | None


class LineageRun(Record):
    run_id: str
    date: str
    steps: int
    status: str
    books: list[BookRef]


class Lineage(Record):
    """models/<name>/lineage.json: where a model comes from and what it was trained on."""
    name: str
    created: str
    parent: str | dict[str, str] | None
    books: list[BookRef]
    runs: list[LineageRun]
    steps: int
    best_val_bpb: float | None
    versions: list[Version] = []


def merge_books(known, new):
    """The books of a lineage plus the new ones (by sha256), in order."""
    seen = {b["sha256"] for b in known}
    return known + [b for b in new if b["sha256"] not in seen]


def now():
    """The date a record carries (created, added, saved, a version's date), in one format."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class BookMeta(Record):
    """books/<name>.json: how a book's text was read, and its sha256."""
    name: str
    filename: str
    bytes: int
    text_bytes: int
    sha256: Sha256
    characters: int
    encoding: str
    format: str
    language: str
    notes: list[str]


class AdapterConfig(Record):
    """models/<name>/adapters/<adapter>/adapter_config.json: a LoRA adapter and the weights it fits."""
    name: str
    base_model: str
    base_sha256: str
    lora: settings(LoRAConfig)
    params: dict[str, int]
    run: dict[str, Any] | None


class Run(Record):
    """checkpoints/<name>/run.json: the last run of a model (or of an adapter), for resume. One
    object from start to end: runs.py creates it (new_run), the trainer sets its status, step and
    clock and saves it, resume loads it. A field that is None is not written, so a run.json holds
    the keys its kind of run has (an adapter's run has adapter, lora, base_sha256)."""
    run_id: str
    books: list[str]  # as the user named them: store names, or the CLI's paths when book_paths
    config: settings(TrainConfig)
    status: str  # running, stopped, done or failed (the trainer's)
    started: float  # time.time() when the run was created: a --minutes budget counts from here
    base_steps: int  # the model's steps before this run
    book_paths: bool = False
    book_refs: list[BookRef] | None = None  # each book's name and sha256 when the run started
    params: dict[str, int] | None = None  # lora.count_params of the model being trained
    step: int = 0
    world_size: int | None = None
    elapsed_s: float | None = None  # the budget's clock, carried over by a resume
    error: str | None = None  # why a failed run failed
    data_changed: list[dict[str, Any]] | None = None  # books that changed before a resume (changed_data)
    adapter: str | None = None  # a LoRA fine-tune: the adapter's name, its settings, the base it fits
    lora: settings(LoRAConfig) | None = None
    base_sha256: Sha256 | None = None

    @classmethod
    def load(cls, path):
        return checked_record(path, cls)

    def save(self, path):
        write_json(path, self.model_dump(exclude_none=True))

    def update(self, **changes):
        for k, v in changes.items():
            setattr(self, k, v)


def new_run(books, tc, **fields):
    """A new run of `books` with options `tc` (a TrainConfig), not yet started."""
    fields = {"status": "running", "base_steps": 0, "started": time.time(), **fields}
    return Run(run_id=uuid.uuid4().hex[:8], books=list(books), config=asdict(tc), **fields)


class Event(Record):
    seq: int
    type: str


class Job(Record):
    """jobs/<id>.json: a training job of the web app and its log."""
    id: str = Field(pattern=r"^[0-9a-f]{1,32}$")  # it names the file the job is saved to
    created: float
    state: str
    model: str
    events: list[Event] = []
