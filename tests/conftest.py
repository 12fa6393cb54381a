"""Shared fixtures: a temp data home, a slice of the example book, a tiny model.

Tests use a tiny config (about 60k parameters) so the whole suite runs in minutes on 2 CPU cores.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from azr_trainer import TrainConfig  # noqa: E402
from app.runs import resume, train  # noqa: E402
from model import ModelConfig  # noqa: E402
from app.store import Store  # noqa: E402

TINY = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32)
LOCAL_URL = "http://127.0.0.1"  # TestClient's base_url: the server answers only to this machine's names


def tiny_config(**changes):
    return ModelConfig(**{**TINY, **changes})


def quick_train_config(**changes):
    """A few fast steps: batch 8 of 32 tokens, fp32 so results are the same on every CPU."""
    opts = dict(steps=20, batch_size=8, eval_every=10, eval_batches=2, checkpoint_every=10,
                warmup_steps=5, precision="fp32", device="cpu")
    return TrainConfig(**{**opts, **changes})


def stop_and_resume(store, book, tc, stop_at, before=lambda: None):
    """The two runs of an exact-resume check: model "whole" trains through; "split", with the same
    tokenizer, stops after `stop_at` steps and resumes. `before` runs ahead of each run (a hand-made
    val curve starting again) -> (split's summary when it stopped, its summary after the resume)."""
    before()
    store.create_model("whole", tiny_config())
    train(store, "whole", [book], tc)
    before()
    store.create_model("split", tiny_config())
    (store.model_dir("split") / "tokenizer.json").write_bytes((store.model_dir("whole") / "tokenizer.json").read_bytes())
    seen = []
    stopped = train(store, "split", [book], tc, on_event=seen.append,
                    should_stop=lambda: sum(e["type"] == "step" for e in seen) >= stop_at)
    return stopped, resume(store, "split")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "home")


@pytest.fixture(scope="session")
def book_text():
    """The first 40 KB of the project's own example book (original text, always present)."""
    return (ROOT / "books" / "example_book.txt").read_text(encoding="utf-8")[:40_000]


@pytest.fixture
def book(store, book_text):
    store.books.add("book", book_text.encode("utf-8"), "book.txt")
    return "book"


def trained_store(home, book_text, name="tiny"):
    """A store at `home` holding the book 'book' and model `name`, trained on it for 20 steps: for
    module-scoped fixtures, which cannot use the per-test `trained`."""
    store = Store(home)
    store.books.add("book", book_text.encode("utf-8"), "book.txt")
    store.create_model(name, tiny_config())
    train(store, name, ["book"], quick_train_config())
    return store


@pytest.fixture
def trained(store, book):
    """A tiny model trained for 20 steps on the book: (store, name)."""
    store.create_model("tiny", tiny_config())
    train(store, "tiny", [book], quick_train_config())
    return store, "tiny"
