"""A new run that fails to start never costs the stopped run its progress.

Stop a run, then start a new one on the same model that cannot start: a book that is not there,
a book too short for a validation split. The stopped run's checkpoints, run.json and metric rows
stay as they were, and resuming continues it from the step it stopped at — from the library, the
CLI and the web API. (Before the fix the new run deleted the checkpoints first, and resume
quietly started the old run again at step 0, rewriting its rows.)"""

import pytest
from fastapi.testclient import TestClient

import cli
from conftest import LOCAL_URL, quick_train_config, tiny_config
from files import NotFound
from app.runs import resume, train
from server import create_app

STOP_AT = 6  # checkpoints at 4 and at the stop


def short_text(book_text):
    """Enough text for the tokenizer, too little for one validation window of 33 tokens."""
    return book_text[:500]


def stopped_run(store, book):
    """Model 'm' trained STOP_AT of 12 steps, then stopped -> (its run folder's files, its metric rows)."""
    store.create_model("m", tiny_config())
    train(store, "m", [book], quick_train_config(steps=12, checkpoint_every=4),
          should_stop=lambda: len(store.metrics("m")) >= STOP_AT)
    return run_files(store), store.metrics("m")


def run_files(store):
    return {p.name: p.read_bytes() for p in store.checkpoint_dir("m").iterdir()}


def starts(on_list):
    return lambda e: on_list.append(e["step"]) if e["type"] == "start" else None


def test_a_failed_start_leaves_the_stopped_run_resumable_at_its_step(store, book, book_text):
    files, rows = stopped_run(store, book)
    store.books.add("short", short_text(book_text).encode(), "short.txt")
    with pytest.raises(NotFound):
        train(store, "m", ["no_such_book"], quick_train_config(steps=2))
    with pytest.raises(ValueError, match="too short"):
        train(store, "m", ["short"], quick_train_config(steps=2))
    assert run_files(store) == files and store.metrics("m") == rows

    started = []
    assert resume(store, "m", on_event=starts(started))["status"] == "done"
    after = store.metrics("m")
    assert started == [STOP_AT] and after[:STOP_AT] == rows  # the first rows untouched, not redone
    assert [r["step"] for r in after] == list(range(1, 13)) and {r["run"] for r in after} == {rows[0]["run"]}


def test_a_new_run_stopped_before_its_first_step_leaves_the_last_run(store, book):
    files, rows = stopped_run(store, book)
    summary = train(store, "m", [book], quick_train_config(steps=4), should_stop=lambda: True)
    assert summary["status"] == "stopped" and summary["step"] == 0
    assert run_files(store) == files and store.metrics("m") == rows


def test_once_the_new_run_has_taken_a_step_it_is_the_one_to_resume(store, book):
    stopped_run(store, book)
    train(store, "m", [book], quick_train_config(steps=4, checkpoint_every=100),
          should_stop=lambda: len(store.metrics("m")) >= STOP_AT + 2)  # two steps of the new run
    assert sorted(p.name for p in store.checkpoint_dir("m").glob("*.safetensors")) == ["step_00000002.safetensors"]
    started = []
    resume(store, "m", on_event=starts(started))
    assert started == [2]


def test_cli_a_failed_train_leaves_the_stopped_run(store, book, book_text, tmp_path, capsys):
    files, rows = stopped_run(store, book)
    short = tmp_path / "short.txt"
    short.write_text(short_text(book_text), encoding="utf-8")
    for bad in ("no_such_book", str(short)):
        code = cli.main(["--home", str(store.home), "train", "m", "--book", bad, "--steps", "2"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
    assert run_files(store) == files and store.metrics("m") == rows
    assert cli.main(["--home", str(store.home), "resume", "m"]) == 0
    assert store.metrics("m")[:STOP_AT] == rows and len(store.metrics("m")) == 12


def test_api_a_failed_train_job_leaves_the_stopped_run(tmp_path, book_text):
    with TestClient(create_app(tmp_path / "home"), base_url=LOCAL_URL) as client:
        jobs, store = client.app.state.azr.jobs, client.app.state.azr.store
        for name, text in (("book", book_text), ("short", short_text(book_text))):
            assert client.post("/upload_book", files={"file": (f"{name}.txt", text.encode())}).status_code == 201
        files, rows = stopped_run(store, "book")
        r = client.post("/train", json={"model": "m", "book": "short", "steps": 2, "batch_size": 8})
        assert r.status_code == 202, r.text
        jobs.join(60)
        assert client.get("/training_status").json()["state"] == "failed"
        assert run_files(store) == files and store.metrics("m") == rows

        # the web job that failed is "the current job": Resume continues the stopped run
        assert client.post("/resume_training").status_code == 200, client.get("/training_status").text
        jobs.join(60)
        job = client.get("/training_status").json()
        assert job["state"] == "done" and job["step"] == 12
        assert [e["step"] for e in job["events"] if e["type"] == "start"] == [STOP_AT]
        assert store.metrics("m")[:STOP_AT] == rows
