"""The look-inside views (`python -m bench views`): each /inside/... request timed the way the page
asks for it, through HTTP, on small-preset models trained for a few steps; and the sample the
trainer writes at each evaluation."""

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app import runs
from azr_trainer import TrainConfig
from hardware import pick_device
from app.store import Store
from bench.common import EXAMPLE_BOOK, ROOT, log, machine_info, timed


def run_views(args):
    """Seconds per request of each /inside/... view: `python server.py` on a free port with a
    temp home (as a user runs it), two small-preset models trained briefly on the example book
    (`small` twice: two runs, two versions), then each request once cold (loads the model, encodes the
    book) and --calls times warm. Plus the sample the trainer writes at each evaluation, timed
    in-process, and the runs view over a long metrics.jsonl (rows copied to 20,000 steps)."""
    text = EXAMPLE_BOOK.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as home:
        url, proc = start_server(home)
        try:
            call = lambda method, path, **kw: httpx_call(url, method, path, **kw)  # noqa: E731
            call("POST", "/upload_book", files={"file": ("example.txt", text.encode())})
            for name in ("small", "other"):
                call("POST", "/create_model", json={"name": name, "preset": "small"})
            for name in ("small", "small", "other"):  # the views' cost hardly depends on the steps
                train_via_api(url, name, 20)
            views = {
                "tokens: a pasted paragraph": ("POST", "/inside/tokens", {"json": {"model": "small", "text": text[2000:3000]}}),
                "tokens: a book (144 KB) counted": ("POST", "/inside/tokens", {"json": {"model": "small", "book": "example"}}),
                "next token, top-k 5": ("POST", "/inside/next_token", {"json": {"model": "small", "prompt": text[:200], "top_k": 5}}),
                "embeddings, current weights": ("GET", "/inside/embeddings", {"params": {"model": "small", "n": 150}}),
                "embeddings, version v001": ("GET", "/inside/embeddings", {"params": {"model": "small", "n": 150, "version": "v001"}}),
                "NF4, mlp.c_fc of layer 3": ("GET", "/inside/nf4", {"params": {"model": "small", "layer": "transformer.h.3.mlp.c_fc"}}),
                "runs of two models (3 runs)": ("GET", "/inside/runs", {"params": [("model", "small"), ("model", "other")]}),
            }
            rows = [time_view(call, label, *spec, args.calls) for label, spec in views.items()]
            lengthen_metrics(Path(home) / "models" / "other" / "metrics.jsonl", 20_000)
            rows.append(time_view(call, "runs, a 20,000-step run", "GET", "/inside/runs", {"params": {"model": "other"}}, args.calls))
            rows.append(time_sample(Store(home), "small", args.calls))
        finally:
            proc.terminate()
            proc.wait(10)
    return {"meta": machine_info(pick_device("cpu"), args, EXAMPLE_BOOK, None), "views": rows}


def start_server(home):
    """`python server.py` on a free port over `home`; -> (url, process) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port), "--home", home], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx_call(url, "GET", "/health")
            return url, proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def httpx_call(url, method, path, **kw):
    try:
        r = httpx.request(method, url + path, timeout=120, **kw)
    except httpx.TransportError as e:
        raise OSError(str(e)) from e
    r.raise_for_status()
    return r.json()


def train_via_api(url, name, steps):
    httpx_call(url, "POST", "/train", json={"model": name, "book": "example", "steps": steps, "batch_size": 8,
                                            "eval_every": 10, "compile": "off"})
    while httpx_call(url, "GET", "/training_status")["state"] in ("queued", "running"):
        time.sleep(0.2)


def time_view(call, label, method, path, kw, calls):
    cold = timed(lambda: call(method, path, **kw))
    warm = [timed(lambda: call(method, path, **kw)) for _ in range(calls)]
    return view_row(label, cold, warm)


def view_row(label, cold, warm):
    row = {"view": label, "cold_ms": 1000 * cold, "median_ms": 1000 * statistics.median(warm), "max_ms": 1000 * max(warm)}
    log(row)
    return row


def lengthen_metrics(path, steps):
    """Copy a run's rows under a new run id until it has `steps` steps: a long run's file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, "a", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({**rows[step % len(rows)], "run": "long", "step": step}) + "\n")


def time_sample(store, name, calls):
    """The trainer's sample at an evaluation: runs.sampler on the stored model, 32 tokens."""
    model, tok = store.load_model(name).eval(), store.tokenizer(name)
    sample = runs.sampler(tok, runs.first_line(EXAMPLE_BOOK.read_text(encoding="utf-8")), TrainConfig(), "cpu")
    cold = timed(lambda: sample(model))
    warm = [timed(lambda: sample(model)) for _ in range(calls)]
    return view_row("sample at an evaluation (in the trainer, 32 tokens)", cold, warm)
