"""The web API, endpoint by endpoint: what a user gets on success, and the 4xx that explains each
mistake. Training jobs run for real (tiny model, a few steps) in the server's worker thread."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import config
from app.web.training import SERVER_CHOOSES
from azr_trainer import TrainConfig
from config import SettingError
from conftest import LOCAL_URL, ROOT, TINY
from files import read_json, write_json
from app.jobs import ACTIVE, RESUMABLE
from app.runs import first_line
from lora import LoRAConfig
from model import ModelConfig
from server import create_app

TRAIN = dict(batch_size=8, eval_every=10, warmup_steps=5, compile="off")  # a few fast steps of the tiny model


def wait_for(client, states=("done", "stopped", "failed"), timeout=60, step=None):
    """Poll /training_status until the job is in one of `states` (or has reached `step`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get("/training_status").json()
        if job["state"] in states or (step is not None and job.get("step", 0) >= step):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job still {job['state']} after {timeout} s: {job}")


def error_of(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(tmp_path / "home"), base_url=LOCAL_URL) as c:
        yield c
        c.app.state.azr.jobs.stop_requested.set()  # never leave a worker training into the next test
        c.app.state.azr.jobs.join(30)


@pytest.fixture
def book(client, book_text):
    r = client.post("/upload_book", files={"file": ("book.txt", book_text.encode())})
    assert r.status_code == 201, r.text
    return "book"


def train(client, model, book, steps=20, **opts):
    r = client.post("/train", json={"model": model, "book": book, "steps": steps, **TRAIN, **opts})
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, book_text):
    """One app with a tiny model trained for 20 steps, shared by the read-only tests."""
    with TestClient(create_app(tmp_path_factory.mktemp("trained")), base_url=LOCAL_URL) as c:
        c.post("/upload_book", files={"file": ("book.txt", book_text.encode())})
        c.post("/create_model", json={"name": "tiny", **TINY})
        train(c, "tiny", "book")
        assert wait_for(c)["state"] == "done"
        yield c


# ----------------------------------------------------------------------------- page and docs


def test_page_has_six_tabs_and_only_local_assets(client):
    html = client.get("/").text
    for tab in ("Create model", "Books", "Training", "Generation", "Models", "Look inside"):
        assert f">{tab}</button>" in html
    assert "http://" not in html and "https://" not in html  # works offline: no CDN
    assert '<script type="module" src="/static/main.js">' in html  # ES modules, no build step
    for asset in ("main.js", "api.js", "chart.js", "style.css", "glossary.html", "favicon.svg"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert 'rel="icon" href="/static/favicon.svg"' in html  # no 404 for a favicon on every load


def test_every_label_of_the_create_and_training_forms_links_the_glossary_and_it_answers(client):
    html, glossary = client.get("/").text, client.get("/static/glossary.html").text
    forms = re.findall(r'<form id="(?:create|train)-form".*?</form>', html, re.S)
    labels = [label for form in forms for label in re.findall(r"<label.*?</label>", form, re.S)]
    settings = [label for label in labels if "data-setting" in label]
    # every field: the model's but dropout, every training field the API offers (self-play's count is
    # its own input), LoRA's rank and alpha
    offered = [f for f in TrainConfig.__dataclass_fields__ if f not in SERVER_CHOOSES | {"selfplay_every"}]
    assert len(settings) == len(ModelConfig.__dataclass_fields__) - 1 + len(offered) + 2
    assert [label for label in settings if 'class="term"' not in label] == []
    anchors = set(re.findall(r'href="/static/glossary.html#(\w+)"', html))
    assert {"d_model", "patience", "warmup_steps", "bits_per_byte", "selfplay"} <= anchors
    assert sorted(a for a in anchors if f'id="{a}"' not in glossary) == []


def test_the_page_derives_its_fields_and_job_states_from_the_code(client):
    page = json.loads(re.search(r'<script id="page-data" type="application/json">(.*?)</script>',
                                client.get("/").text, re.S).group(1))
    assert page["job_states"] == {"active": list(ACTIVE), "resumable": list(RESUMABLE)}
    assert "device" not in page["train_offered"] and "patience" in page["train_offered"]
    assert page["train"]["precision"]["choices"] and page["train"]["keep_best"]["kind"] == "bool"
    assert page["languages"]["pl"] == "Polish"


def test_docs_describe_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    expected = ["/create_model", "/upload_book", "/books", "/books/{name}", "/train", "/training_status",
                "/stop_training", "/resume_training", "/generate", "/generate_stream", "/attention", "/arena",
                "/models", "/models/{name}", "/models/{name}/metrics", "/models/{name}/rollback",
                "/download_model/{name}", "/merge", "/estimate", "/health", "/inside/tokens", "/inside/next_token",
                "/inside/embeddings", "/inside/nf4", "/inside/runs", "/models/{name}/step_time"]
    assert sorted(set(expected) - set(paths)) == []
    assert "requestBody" in paths["/train"]["post"]


def test_docs_work_offline(client):
    html = client.get("/docs").text
    assert "swagger-ui" in html and "http://" not in html and "https://" not in html  # no CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs-assets/{asset}").status_code == 200


def test_the_schema_documents_our_error_shape_ranges_and_answers(client):
    spec = client.get("/openapi.json").json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    assert "HTTPValidationError" not in schemas and set(schemas["ErrorBody"]["properties"]) == {"error", "field"}
    for code in ("400", "404", "409", "422"):
        assert paths["/train"]["post"]["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}
    assert "413" in paths["/upload_book"]["post"]["responses"] and "413" in paths["/train"]["post"]["responses"]
    temperature = schemas["GenerateRequest"]["properties"]["temperature"]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 5.0)
    assert schemas["TrainRequest"]["properties"]["lora_r"]["minimum"] == 1
    ok = paths["/models/{name}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ModelDetail"}


def test_health(client):
    h = client.get("/health").json()
    assert h["ok"] and h["job"] == "idle" and h["max_upload_bytes"] == 50 * 2**20


# ----------------------------------------------------------------------------- create model


def test_estimate_counts_parameters_and_memory(client):
    e = client.get("/estimate", params=TINY).json()
    assert e["params"] == 512 * 32 + 32 * 32 + 2 * (4 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 64 + 64 + 64 * 32 + 32) + 64
    m = e["memory"]  # the peak: gradients only exist once the activations are freed
    assert m["total"] == m["weights"] + m["optimizer_state"] + max(m["activations"], m["grads"])
    assert e["optimizer"] == TrainConfig.optimizer
    adamw = client.get("/estimate", params={**TINY, "optimizer": "adamw"}).json()["memory"]
    assert adamw["optimizer_state"] == 8 * e["params"]  # two moments per parameter
    # Muon keeps one momentum per weight of the blocks' matrices (2 blocks of 32 x 96, 32 x 32, 32 x 64, 64 x 32)
    muon = client.get("/estimate", params={**TINY, "optimizer": "muon"}).json()["memory"]
    assert muon["optimizer_state"] == adamw["optimizer_state"] - 4 * 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32)


def test_estimate_explains_a_bad_config_and_names_the_field(client):
    r = client.get("/estimate", params={**TINY, "num_heads": 3})
    assert r.json()["field"] == "num_heads" and "divisible by num_heads" in error_of(r, 400)
    r = client.get("/estimate", params={**TINY, "num_layers": 0})
    assert r.json()["field"] == "num_layers" and "between 1 and 96" in error_of(r, 400)
    r = client.get("/estimate", params={**TINY, "vocab_size": "lots"})
    assert r.json()["field"] == "vocab_size" and "integer" in error_of(r, 422)


def test_create_model_from_preset_or_numbers(client):
    r = client.post("/create_model", json={"name": "s", "preset": "small"})
    assert r.status_code == 201 and r.json()["config"]["d_model"] == 128
    r = client.post("/create_model", json={"name": "t", **TINY})
    assert r.json()["config"]["vocab_size"] == 512 and r.json()["steps"] == 0
    r = client.post("/create_model", json={"name": "s2", "preset": "small", "num_layers": 2})
    assert r.json()["config"]["num_layers"] == 2 and r.json()["config"]["d_model"] == 128
    assert [m["name"] for m in client.get("/models").json()] == ["s", "s2", "t"]


def test_step_time_probes_this_machine_before_a_run(client):
    client.post("/create_model", json={"name": "t", **TINY})
    e = client.get("/models/t/step_time", params={"batch_size": 4}).json()
    assert 0 < e["seconds_per_step"] < 10 and e["precision"] in ("fp32", "bf16") and e["compile_reason"]
    e = client.get("/models/t/step_time", params={"minutes": 0.5, "compile": "auto"}).json()
    assert not e["compile"]  # a half-minute budget never pays for compiling
    r = client.get("/models/t/step_time", params={"batch_size": 0})
    assert r.json()["field"] == "batch_size" and "between 1 and" in error_of(r, 400)
    assert "no model named" in error_of(client.get("/models/nope/step_time"), 404)


@pytest.mark.parametrize("body, status, words", [
    ({"name": "../evil", "preset": "small"}, 400, "invalid model name"),
    ({"name": "a/b", "preset": "small"}, 400, "invalid model name"),
    ({"name": "x", "preset": "huge"}, 422, "preset"),
    ({"name": "x", "d_model": 10**9}, 400, "d_model must be between"),
    ({"name": "x", "num_heads": 3}, 400, "divisible"),
    ({"name": "x", "d_modle": 64}, 422, "d_modle"),
    ({"preset": "small"}, 422, "name"),
])
def test_create_model_rejects(client, body, status, words):
    assert words in error_of(client.post("/create_model", json=body), status)
    assert client.get("/models").json() == []


def test_create_model_twice_is_a_conflict(client):
    client.post("/create_model", json={"name": "t", **TINY})
    assert "already exists" in error_of(client.post("/create_model", json={"name": "t", **TINY}), 409)


# ----------------------------------------------------------------------------- books


def test_upload_book_reports_encoding_language_and_preview(client):
    text = "Капитанская дочка. Береги честь смолоду. " * 40
    r = client.post("/upload_book", files={"file": ("капитан.txt", text.encode("cp1251"))}, data={"name": "kapitan"})
    b = r.json()
    assert r.status_code == 201 and b["name"] == "kapitan"
    assert b["encoding"] == "cp1251" and b["language"] == "ru" and b["characters"] == len(text)
    assert b["preview"].startswith("Капитанская дочка")
    # the page's default prompt for a model of this book: its first line, as the training samples use
    listed = [(x["name"], x["first_line"]) for x in client.get("/books").json()]
    assert listed == [("kapitan", first_line(text))]
    assert client.get("/books/kapitan").json()["preview"] == b["preview"]


def test_upload_name_defaults_to_a_safe_file_name(client):
    r = client.post("/upload_book", files={"file": ("../../My Book!.txt", b"Some text of a book. " * 10)})
    assert r.json()["name"] == "My_Book"


@pytest.mark.parametrize("content, name, status, words", [
    (b"", None, 400, "empty"),
    (bytes(range(256)) * 40, None, 400, "binary"),
    (b"A fine book text. " * 10, "a/b", 400, "invalid book name"),
    (b"A fine book text. " * 10, "..", 400, "invalid book name"),
])
def test_upload_rejects(client, content, name, status, words):
    r = client.post("/upload_book", files={"file": ("x.txt", content)}, data={"name": name} if name else {})
    assert words in error_of(r, status)
    assert client.get("/books").json() == []


def test_upload_duplicate_is_a_conflict(client, book):
    r = client.post("/upload_book", files={"file": ("book.txt", b"Another book entirely. " * 10)})
    assert "already exists" in error_of(r, 409)


def test_upload_over_the_limit_is_413_with_or_without_content_length(tmp_path):
    with TestClient(create_app(tmp_path, max_upload_mb=0.01), base_url=LOCAL_URL) as c:  # 10 KB
        r = c.post("/upload_book", files={"file": ("big.txt", b"word " * 4000)})
        assert "upload limit" in error_of(r, 413)
        from app.web.books import read_upload  # the streaming check, for clients that send no Content-Length
        with pytest.raises(ValueError, match="upload limit"):
            read_upload(type("F", (), {"file": io.BytesIO(b"x" * 20_000)})(), 10_000)
        assert c.get("/books").json() == [] and not list((tmp_path / "books").iterdir())


def test_delete_book(client, book):
    assert client.delete("/books/book").json() == {"deleted": "book"}
    assert "no book named" in error_of(client.get("/books/book"), 404)
    assert "no book named" in error_of(client.delete("/books/book"), 404)


def test_upload_says_how_many_bytes_became_replacement_characters(client):
    data = ("Береги честь смолоду.\n" * 200).encode()
    at = data.index(b"\n") + 1
    b = client.post("/upload_book", files={"file": ("b.txt", data[:at] + b"\xff" + data[at:])}).json()
    assert b["encoding"] == "utf-8" and b["replaced"] == 1 and "U+FFFD): 1" in " ".join(b["notes"])
    assert b["preview"].startswith("Береги честь смолоду.\n\ufffdБереги")


# ----------------------------------------------------------------------------- training


def test_train_runs_in_the_background_and_reports_progress(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    job = train(client, "t", book, steps=20)
    assert job["state"] == "queued" and job["total"] == 20
    done = wait_for(client)
    assert done["state"] == "done" and done["step"] == 20 and done["error"] is None
    assert done["val_bpb"] > 0 and done["tokens_per_s"] > 0 and done["eta_s"] == 0
    assert done["end_reason"] == "steps"  # why it ended, for the page: all its steps done
    events = client.get("/training_status").json()["events"]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done" and "step" in {e["type"] for e in events}
    last = events[-1]["seq"]  # the log can be read incrementally
    assert client.get("/training_status", params={"since": last}).json()["events"] == []
    assert [e["seq"] for e in client.get("/training_status", params={"since": last - 1}).json()["events"]] == [last]
    info = client.get("/models/t").json()
    assert info["steps"] == 20 and len(info["versions"]) == 1 and info["books"][0]["name"] == "book"
    rows = client.get("/models/t/metrics", params={"run": done["run_id"]}).json()["rows"]
    assert [r["step"] for r in rows] == list(range(1, 21)) and "val_bpb" in rows[-1]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "ghost", "book": "book"}, 404, "no model named"),
    ({"model": "t", "book": "ghost"}, 404, "no book named"),
    ({"model": "t"}, 400, "at least one book"),
    ({"model": "t", "book": "../../etc/passwd"}, 400, "invalid book name"),
    ({"model": "t", "book": "book", "steps": 0}, 400, "steps must be between"),
    ({"model": "t", "book": "book", "learning_rate": 5}, 400, "learning_rate"),
    ({"model": "t", "book": "book", "iteratons": 5}, 422, "iteratons"),
    ({"model": "t", "book": "book", "seq_len": 64}, 400, "longer than the model's context (max_seq_len 32)"),
    ({"model": "t", "book": "book", "seed": 2**63}, 400, "seed must be between 0 and 9223372036854775807"),
    ({"model": "t", "book": "book", "steps": "5"}, 422, "steps"),
    ({"model": "t", "book": "book", "steps": True}, 422, "steps"),
    ({"model": "t", "books": ["book"] * 300}, 400, "named more than once"),
    ({"model": "t", "book": "book", "batch_size": 1024, "grad_accum": 1024}, 400, "33,554,432 tokens, more than"),
])
def test_train_rejects(client, book, body, status, words):
    client.post("/create_model", json={"name": "t", **TINY})
    assert words in error_of(client.post("/train", json=body), status)
    assert client.get("/training_status").json()["state"] == "idle"


@pytest.mark.parametrize("change, field", [({"steps": 0}, "steps"), ({"seq_len": 64}, "seq_len"),
                                           ({"seed": 2**63}, "seed"), ({"sample_prompt": "x" * 501}, "sample_prompt")])
def test_a_refused_setting_names_its_field(client, book, change, field):
    client.post("/create_model", json={"name": "t", **TINY})
    assert client.post("/train", json={"model": "t", "book": "book", **change}).json()["field"] == field


def test_a_setting_error_names_the_field_as_the_edge_calls_it():
    with pytest.raises(SettingError) as e:
        config.build(LoRAConfig, {"targets": []}, prefix="lora_")
    assert e.value.field == "lora_targets" and str(e.value).startswith("lora_targets must")


def test_one_job_at_a_time_and_generation_keeps_working(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=5000)
    wait_for(client, states=(), step=3)  # the tokenizer exists from the first step: the model can generate
    assert "already running" in error_of(client.post("/train", json={"model": "t", "book": "book"}), 409)
    r = client.post("/generate", json={"model": "t", "prompt": "The", "max_new_tokens": 10})
    assert r.status_code == 200 and client.get("/training_status").json()["state"] == "running"
    assert "while it is training" in error_of(client.delete("/models/t"), 409)
    assert "while it is training" in error_of(client.post("/models/t/rollback", json={"version": "v001"}), 409)
    client.post("/stop_training")
    assert wait_for(client)["state"] == "stopped"


def test_stop_ends_a_step_of_many_micro_batches_at_once(client, book):
    """A step of 1024 micro-batches of 64 windows takes far longer than a few seconds; Stop drops
    it half-way (the run stays at step 0) instead of waiting for it to end."""
    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=10, batch_size=64, grad_accum=1024)
    deadline = time.time() + 60
    while not any(e["type"] == "start" for e in client.get("/training_status").json()["events"]):
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first step's micro-batches
    t0 = time.perf_counter()
    client.post("/stop_training")
    stopped = wait_for(client)
    assert stopped["state"] == "stopped" and stopped["step"] == 0, stopped
    assert time.perf_counter() - t0 < 3, f"Stop took {time.perf_counter() - t0:.1f} s"


def test_stop_and_resume(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=30)
    wait_for(client, states=(), step=5)
    assert client.post("/stop_training").status_code == 200
    stopped = wait_for(client)
    assert stopped["state"] == "stopped" and 5 <= stopped["step"] < 30 and stopped["end_reason"] == "stopped"
    assert client.post("/resume_training").status_code == 200
    done = wait_for(client)
    assert done["state"] == "done" and done["step"] == 30 and done["id"] == stopped["id"]
    assert client.get("/models/t").json()["steps"] == 30
    rows = client.get("/models/t/metrics", params={"run": done["run_id"]}).json()["rows"]
    assert [r["step"] for r in rows] == list(range(1, 31))  # every step once, none lost or doubled


def test_resume_after_the_book_changed_needs_changed_data_and_the_lineage_says_so(client, book, book_text):
    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=200)
    wait_for(client, states=(), step=3)
    client.post("/stop_training")
    assert wait_for(client)["state"] == "stopped"
    client.delete(f"/books/{book}")
    client.post("/upload_book", data={"name": book}, files={"file": ("b.txt", book_text[::-1].encode())})
    assert "changed since this run started" in error_of(client.post("/resume_training"), 409)
    assert client.post("/resume_training", json={"changed_data": False}).status_code == 409
    assert client.post("/resume_training", json={"changed_data": True}).status_code == 200
    client.post("/stop_training")
    wait_for(client)
    run = client.get("/models/t").json()["runs"][-1]
    assert run["data_changed"][0]["books"][0]["book"] == book


def test_a_damaged_checkpoint_warning_names_no_server_path(client, book, monkeypatch):
    import files

    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=200, checkpoint_every=2)
    wait_for(client, states=(), step=5)
    client.post("/stop_training")
    wait_for(client)
    home, load_file = client.app.state.azr.store.home, files.load_file
    newest = max((home / "checkpoints" / "t").glob("step_*.safetensors"))

    def unreadable(path):
        if path == str(newest):
            raise OSError(5, "Input/output error", path)
        return load_file(path)
    monkeypatch.setattr(files, "load_file", unreadable)
    stopped_at = client.get("/training_status").json()["step"]
    client.post("/resume_training")
    job = wait_for(client, states=(), step=stopped_at + 3)
    client.post("/stop_training")
    wait_for(client)
    warning = next(e["message"] for e in job["events"] if e["type"] == "warning")
    assert f"checkpoints/t/{newest.name}" in warning and str(home) not in warning


def test_stop_and_resume_without_a_job_are_conflicts(client):
    assert "no training job is running" in error_of(client.post("/stop_training"), 409)
    assert "no stopped or interrupted job" in error_of(client.post("/resume_training"), 409)


def test_resume_a_finished_job_is_a_conflict(trained):
    assert "no stopped or interrupted job" in error_of(trained.post("/resume_training"), 409)


def test_restart_while_training_shows_interrupted_then_resumes(tmp_path, book_text):
    """A server that dies mid-run leaves its job file saying "running" and no thread behind it.
    We train, stop at a checkpoint and put the files back the way a crash leaves them."""
    home = tmp_path / "home"
    with TestClient(create_app(home), base_url=LOCAL_URL) as c1:
        c1.post("/upload_book", files={"file": ("book.txt", book_text.encode())})
        c1.post("/create_model", json={"name": "t", **TINY})
        train(c1, "t", "book", steps=30, checkpoint_every=5)
        wait_for(c1, states=(), step=7)
        c1.post("/stop_training")
        crashed = wait_for(c1)
    job_file = home / "jobs" / f"{crashed['id']}.json"
    run_file = home / "checkpoints" / "t" / "run.json"
    write_json(job_file, {**read_json(job_file), "state": "running"})
    write_json(run_file, {**read_json(run_file), "status": "running"})

    with TestClient(create_app(home), base_url=LOCAL_URL) as c2:  # the restarted server
        job = c2.get("/training_status").json()
        assert job["state"] == "interrupted" and "Resume" in job["error"] and job["step"] == crashed["step"]
        assert read_json(job_file)["state"] == "interrupted"
        assert c2.post("/resume_training").status_code == 200
        done = wait_for(c2)
        assert done["state"] == "done" and done["step"] == 30
        assert c2.get("/models/t").json()["steps"] == 30
        rows = c2.get("/models/t/metrics", params={"run": done["run_id"]}).json()["rows"]
        assert [r["step"] for r in rows] == list(range(1, 31))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home, port, *args):
    """`python server.py` in a subprocess; one torch thread, as the tiny model gains nothing from more."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port), "--home", str(home), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start: " + proc.stderr.read().decode()[-2000:])


@pytest.mark.slow
def test_killed_server_leaves_an_interrupted_job_that_resumes(tmp_path, book_text):
    """The real thing: SIGKILL the server process mid-run, start a new one on the same home."""
    home, port = tmp_path / "home", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(home, port)
    try:
        httpx.post(f"{url}/upload_book", files={"file": ("book.txt", book_text.encode())})
        httpx.post(f"{url}/create_model", json={"name": "t", **TINY})
        httpx.post(f"{url}/train", json={"model": "t", "book": "book", "steps": 5000, "checkpoint_every": 5, **TRAIN})
        while httpx.get(f"{url}/training_status").json().get("step", 0) < 8:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start_server(home, port)
    try:
        job = httpx.get(f"{url}/training_status").json()
        assert job["state"] == "interrupted"
        assert httpx.post(f"{url}/resume_training").status_code == 200
        while (job := httpx.get(f"{url}/training_status").json())["state"] == "queued":
            time.sleep(0.1)
        assert job["state"] == "running" and job["step"] >= 5  # continued from a checkpoint, not from 0
        httpx.post(f"{url}/stop_training")
        while (job := httpx.get(f"{url}/training_status").json())["state"] == "running":
            time.sleep(0.1)
        assert job["state"] == "stopped"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_selfplay_every_is_passed_to_the_trainer(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    r = client.post("/train", json={"model": "t", "book": book, "steps": 4, "selfplay_every": 2, "selfplay_start": 0.0,
                                    **TRAIN})
    assert r.json()["config"]["selfplay_every"] == 2
    job = wait_for(client, timeout=120)
    rows = client.get("/models/t/metrics", params={"run": job.get("run_id")}).json()["rows"]
    assert job["state"] == "done", job["error"]
    assert [r["step"] for r in rows if "selfplay" in r] == [2, 4] and job["repeat_rate"] is not None
    logged = [e["step"] for e in client.get("/training_status").json()["events"] if e["type"] == "step"]
    assert 2 not in logged  # a self-play step alone is no reason for a log line: one per evaluation
    x = client.get("/models/t/selfplay_example").json()  # the teaching view: the latest rollout, as text
    assert x["step"] == 4 and len(x["tokens"]) == 16  # the tiny model's context of 32: 16 prompt + 16 written
    assert all(set(t) == {"text", "pushed_down"} for t in x["tokens"]) and x["prompt"]
    assert "no model named" in error_of(client.get("/models/ghost/selfplay_example"), 404)


def test_lora_finetune_generate_and_merge(trained):
    """A LoRA job trains an adapter of the frozen model; generation can use it; merge makes a model."""
    job = trained.post("/train", json={"model": "tiny", "book": "book", "steps": 10, "mode": "lora",
                                       "adapter": "ad", "lora_r": 4, "lora_alpha": 8, "lora_targets": ["c_attn"],
                                       "learning_rate": 1e-2, **TRAIN}).json()  # a visible change in 10 steps
    assert job["kind"] == "lora" and job["adapter"] == "ad" and job["lora"]["r"] == 4
    done = wait_for(trained)
    assert done["state"] == "done", done["error"]
    rows = trained.get("/models/tiny/metrics", params={"adapter": "ad", "run": done["run_id"]}).json()["rows"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    [ad] = trained.get("/models/tiny").json()["adapters"]
    assert ad["name"] == "ad" and ad["lora"]["targets"] == ["c_attn"] and ad["run"]["steps"] == 10
    assert trained.get("/models/tiny").json()["steps"] == 20  # the base did not train
    body = {"model": "tiny", "prompt": "The sea", "max_new_tokens": 1, "temperature": 0}
    plain, adapted = first_token(trained, body), first_token(trained, {**body, "adapter": "ad"})
    assert plain["prob"] != pytest.approx(adapted["prob"], abs=1e-7)  # the adapter changes the model
    merged = trained.post("/merge", json={"model": "tiny", "adapter": "ad", "out": "tiny-ad"})
    assert merged.status_code == 201 and merged.json()["parent"] == {"model": "tiny", "adapter": "ad"}
    assert first_token(trained, {**body, "model": "tiny-ad"})["prob"] == pytest.approx(adapted["prob"], rel=1e-4)
    assert trained.delete("/models/tiny/adapters/ad").json() == {"deleted": "ad", "model": "tiny"}
    assert trained.get("/models/tiny").json()["adapters"] == []
    assert "no adapter 'ad'" in error_of(trained.delete("/models/tiny/adapters/ad"), 404)


def first_token(client, body):
    with client.stream("POST", "/generate_stream", json=body) as r:
        return json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])


@pytest.mark.parametrize("change, status, words", [
    ({"adapter": None}, 400, "name the adapter"),
    ({"adapter": "a/b"}, 400, "invalid adapter name"),
    ({"lora_r": 0}, 400, "r must be between"),
    ({"lora_targets": ["wte"]}, 422, "lora_targets"),
    ({"model": "ghost"}, 404, "no model named"),
])
def test_lora_finetune_rejects(trained, change, status, words):
    body = {"model": "tiny", "book": "book", "mode": "lora", "adapter": "x", **change}
    assert words in error_of(trained.post("/train", json=body), status)


def test_lora_needs_a_trained_model_and_a_known_adapter(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    r = client.post("/train", json={"model": "t", "book": book, "mode": "lora", "adapter": "x"})
    assert "no tokenizer yet" in error_of(r, 400)
    assert "no adapter 'x'" in error_of(client.post("/merge", json={"model": "t", "adapter": "x", "out": "m"}), 404)


# ----------------------------------------------------------------------------- generation


def test_generate_is_reproducible_with_a_seed(trained):
    body = {"model": "tiny", "prompt": "The", "max_new_tokens": 30, "seed": 7}
    a, b = trained.post("/generate", json=body).json(), trained.post("/generate", json=body).json()
    assert a["text"] == b["text"] and len(a["text"]) > 0


def test_generate_stream_sends_one_event_per_token(trained):
    body = {"model": "tiny", "prompt": "The", "max_new_tokens": 30, "seed": 7}
    with trained.stream("POST", "/generate_stream", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        blocks = r.read().decode().strip().split("\n\n")
    tokens = [json.loads(b[len("data: "):]) for b in blocks if b.startswith("data: ")]
    done = json.loads(blocks[-1].split("data: ", 1)[1])
    assert blocks[-1].startswith("event: done") and done["tokens"] == len(tokens) and done["first_token_s"] > 0
    assert "".join(t["text"] for t in tokens) == trained.post("/generate", json=body).json()["text"]
    t = next(t for t in tokens if t["prob"] is not None)
    assert 0 < t["prob"] <= 1 and len(t["top"]) == 5 and t["top"][0][1] >= t["top"][-1][1]


def test_generate_stream_pings_while_no_token_is_ready(trained, monkeypatch):
    import fastapi.routing
    from app.web import generation

    def slow_stream(*args):
        time.sleep(0.3)  # a long prompt being read
        yield "a", 1, torch.full((512,), 1 / 512)
    monkeypatch.setattr(fastapi.routing, "_PING_INTERVAL", 0.05)
    monkeypatch.setattr(generation, "stream", slow_stream)
    with trained.stream("POST", "/generate_stream", json={"model": "tiny", "prompt": "The"}) as r:
        blocks = r.read().decode().strip().split("\n\n")
    assert blocks[0] == ": ping" and json.loads(blocks[-2][len("data: "):])["text"] == "a"
    assert blocks[-1].startswith("event: done")


@pytest.mark.parametrize("change, status, words", [
    ({"temperature": 100}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"seed": 2**63}, 400, "seed"),
    ({"top_k": "5"}, 422, "top_k"),
    ({"max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, 400, "max_new_tokens"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"top_k": -1}, 400, "top_k"),
    ({"model": "ghost"}, 404, "no model named"),
    ({"model": "../x"}, 400, "invalid model name"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"prompt": "x" * 100_001}, 422, "prompt"),
])
@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_generate_rejects(trained, path, change, status, words):
    r = trained.post(path, json={"model": "tiny", "prompt": "The", **change})
    assert words in error_of(r, status) and r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("top_p", [1e-300, 0.0])
def test_a_tiny_top_p_keeps_the_likeliest_token(trained, top_p):
    body = {"model": "tiny", "prompt": "The", "max_new_tokens": 10, "top_p": top_p, "seed": 1}
    greedy = trained.post("/generate", json={**body, "top_p": 1.0, "temperature": 0}).json()["text"]
    assert trained.post("/generate", json=body).json()["text"] == greedy  # only the top token survives
    text = trained.post("/generate_stream", json=body).text
    assert "event: done" in text and "event: error" not in text


def test_a_seed_past_2_63_is_refused_the_same_way_everywhere(trained):
    seed = 2**63
    answers = [trained.post("/generate", json={"model": "tiny", "seed": seed}),
               trained.post("/arena", json={"model_a": "tiny", "model_b": "tiny", "seed": seed}),
               trained.post("/create_model", json={"name": "s", **TINY, "seed": seed}),
               trained.post("/train", json={"model": "tiny", "book": "book", "seed": seed})]
    assert {error_of(r, 400) for r in answers} == {f"seed must be between 0 and {seed - 1}, got {seed}"}


@pytest.mark.parametrize("path, field", [("/create_model", "d_model"), ("/generate", "max_new_tokens"),
                                         ("/train", "steps"), ("/arena", "windows"), ("/attention", "layer")])
@pytest.mark.parametrize("value", ["5", True, 5.0])
def test_a_whole_number_field_takes_only_a_whole_number(trained, path, field, value):
    body = {"name": "n", "model": "tiny", "model_a": "tiny", "model_b": "tiny", "prompt": "The", "book": "book"}
    body = {k: v for k, v in body.items() if k in {"/create_model": {"name"}, "/arena": {"model_a", "model_b"},
                                                   "/train": {"model", "book"}}.get(path, {"model", "prompt"})}
    assert field in error_of(trained.post(path, json={**body, field: value}), 422)


def test_arena_with_a_book_leaves_the_cached_model_in_eval_mode(trained):
    body = {"model_a": "tiny", "model_b": "tiny", "prompt": "The", "max_new_tokens": 5, "book": "book", "windows": 4}
    assert trained.post("/arena", json=body).status_code == 200
    model, _ = trained.app.state.azr.models.get("tiny")
    assert not model.training  # dropout stays off for the next request


def test_errors_name_no_server_path_and_echo_no_huge_value(tmp_path, monkeypatch):
    app = create_app(tmp_path / "home")
    store = app.state.azr.store
    with TestClient(app, base_url=LOCAL_URL, raise_server_exceptions=False) as client:
        client.post("/create_model", json={"name": "t", **TINY})

        def unreadable(name):
            raise PermissionError(13, "Permission denied", str(store.home / "models" / name / "lineage.json"))
        monkeypatch.setattr(store, "info", unreadable)
        r = client.get("/models/t")
        assert r.status_code == 500 and "models/t/lineage.json" in r.text and str(store.home) not in r.text
        huge = "v" * 20 * 2**20
        for r in (client.post("/models/t/rollback", json={"version": huge}),
                  client.post("/create_model", json={"name": huge}),
                  client.post("/generate", json={"model": "t", huge: 1}),
                  client.post("/upload_book", data={"name": huge}, files={"file": ("b.txt", b"some text " * 10)})):
            assert 400 <= r.status_code < 500 and len(r.content) < 3000, r.content[:200]


def test_generate_from_an_untrained_model_says_train_first(client):
    client.post("/create_model", json={"name": "t", **TINY})
    assert "train it on a book first" in error_of(client.post("/generate", json={"model": "t"}), 409)


def test_attention_rows_are_causal_distributions(trained):
    a = trained.post("/attention", json={"model": "tiny", "prompt": "The sea was calm", "layer": 1, "head": 1}).json()
    T = len(a["tokens"])
    assert T >= 3 and len(a["attention"]) == T and a["num_layers"] == 2 and a["num_heads"] == 2
    for i, row in enumerate(a["attention"]):
        assert sum(row) == pytest.approx(1, abs=1e-3) and all(w == 0 for w in row[i + 1:])
    mean = trained.post("/attention", json={"model": "tiny", "prompt": "The sea was calm", "layer": 1, "head": None}).json()
    h0 = trained.post("/attention", json={"model": "tiny", "prompt": "The sea was calm", "layer": 1, "head": 0}).json()
    assert mean["attention"][2][0] == pytest.approx((h0["attention"][2][0] + a["attention"][2][0]) / 2, abs=2e-4)


@pytest.mark.parametrize("change, words", [({"layer": 2}, "layer must be between 0 and 1"),
                                           ({"head": 5}, "head must be between 0 and 1"),
                                           ({"prompt": ""}, "type a prompt first")])
def test_attention_rejects(trained, change, words):
    body = {"model": "tiny", "prompt": "The sea", **change}
    assert words in error_of(trained.post("/attention", json=body), 400)


def test_arena_runs_both_models_with_one_seed_and_scores_the_book(trained):
    r = trained.post("/arena", json={"model_a": "tiny", "model_b": "tiny", "prompt": "The", "max_new_tokens": 20,
                                     "book": "book", "windows": 8}).json()
    assert r["a"]["text"] == r["b"]["text"]  # same model, same seed
    assert 0 <= r["a"]["repeats"] == r["b"]["repeats"] <= 1  # how much each loops (seq-rep-4)
    assert r["a"]["bits_per_byte"] == r["b"]["bits_per_byte"] > 0
    assert r["a"]["bits_per_byte"] < 8  # trained: better than a byte per byte
    assert "no book named" in error_of(trained.post("/arena", json={"model_a": "tiny", "model_b": "tiny", "book": "x"}), 404)
    assert "no model named" in error_of(trained.post("/arena", json={"model_a": "tiny", "model_b": "ghost"}), 404)
    assert "windows" in error_of(trained.post("/arena", json={"model_a": "tiny", "model_b": "tiny", "windows": 0}), 400)


# ----------------------------------------------------------------------------- models


def test_model_info_metrics_and_unknown_model(trained):
    info = trained.get("/models/tiny").json()
    assert info["params"] > 0 and info["size_bytes"] > 0 and info["runs"][0]["status"] == "done"
    m = trained.get("/models/tiny/metrics", params={"since": 15}).json()
    assert [r["step"] for r in m["rows"]] == [16, 17, 18, 19, 20] and m["next"] == 20 and not m["reset"]
    assert trained.get("/models/tiny/metrics", params={"since": 99}).json()["reset"]  # file rewritten: start over
    assert "no model named" in error_of(trained.get("/models/ghost"), 404)
    assert "no model named" in error_of(trained.get("/models/ghost/metrics"), 404)


def test_download_zip_holds_the_model_and_a_readme_that_works(trained, tmp_path):
    r = trained.get("/download_model/tiny")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == sorted(f"tiny/{f}" for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                                 "lineage.json", "metrics.jsonl", "README.txt"))
    z.extractall(tmp_path)
    readme = (tmp_path / "tiny" / "README.txt").read_text()
    block = readme.split("Load it with")[1].split("\nOr put it back")[0]
    code = "\n".join(line[4:] for line in block.splitlines() if line.startswith("    ") or not line.strip())
    code = code.replace("SamplingConfig(max_new_tokens=100)", "SamplingConfig(max_new_tokens=5, seed=1)")
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not list(tmp_path.glob("azr-*.zip"))


def test_download_refuses_anything_but_a_model(trained):
    assert "no model named" in error_of(trained.get("/download_model/ghost"), 404)
    assert "format" in error_of(trained.get("/download_model/tiny", params={"format": "onnx"}), 422)
    assert "no adapter 'x'" in error_of(trained.get("/download_adapter/tiny/x", params={"format": "peft"}), 404)
    assert trained.get("/download_model/..%2F..%2Fetc").status_code in (400, 404)


def test_rollback_restores_a_version_and_the_cache_sees_it(client, book):
    client.post("/create_model", json={"name": "t", **TINY})
    train(client, "t", book, steps=10)
    wait_for(client)
    cache = client.app.state.azr.models
    body = {"model": "t", "prompt": "The", "max_new_tokens": 20, "seed": 3}
    v1_text = client.post("/generate", json=body).json()["text"]
    first = cache.get("t")[0]
    assert cache.get("t")[0] is first  # loaded once
    train(client, "t", book, steps=10)
    wait_for(client)
    assert cache.get("t")[0] is not first  # new weights on disk: reloaded
    assert client.get("/models/t").json()["steps"] == 20
    r = client.post("/models/t/rollback", json={"version": "v001"})
    assert r.status_code == 200 and r.json()["steps"] == 10
    assert client.post("/generate", json=body).json()["text"] == v1_text
    assert "no version 'v009'" in error_of(client.post("/models/t/rollback", json={"version": "v009"}), 404)
    assert "version" in error_of(client.post("/models/t/rollback", json={}), 422)


def test_delete_model(client):
    client.post("/create_model", json={"name": "t", **TINY})
    assert client.delete("/models/t").json() == {"deleted": "t"}
    assert client.get("/models").json() == []
    assert "no model named" in error_of(client.delete("/models/t"), 404)


# ----------------------------------------------------------------------------- errors


def test_unexpected_errors_are_json_500_and_the_server_goes_on(tmp_path):
    app = create_app(tmp_path)
    with TestClient(app, base_url=LOCAL_URL, raise_server_exceptions=False) as c:
        app.state.azr.store.list_models = lambda: 1 / 0
        r = c.get("/models")
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]
        assert c.get("/books").status_code == 200


def test_unknown_routes_and_methods_are_json(client):
    assert error_of(client.get("/nope"), 404) == "Not Found"
    assert error_of(client.post("/health"), 405) == "Method Not Allowed"
