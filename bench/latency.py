"""First-streamed-token latency of POST /generate_stream for the small preset, measured by a client.

    python -m bench latency [--runs 20] [--book books/example_book.txt]

Starts `python server.py` on a free port with a temp AZR_HOME, creates a model with preset small,
trains it a few steps, then times (client side, httpx) from sending the request to receiving the
first `data:` event. The first request loads the model from disk (cold); the rest hit the cache
(warm). Then the same again while a training job of the same model runs in the server.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token(url, body):
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def measure(url, runs, label):
    firsts, totals = [], []
    for i in range(runs):
        f, t = first_token(url, {"model": "small", "prompt": "Once upon a time", "max_new_tokens": 50, "seed": i})
        firsts.append(f)
        totals.append(t)
    q = statistics.quantiles(firsts, n=10)
    print(f"{label}: first token median {1000 * statistics.median(firsts):.1f} ms, p10 {1000 * q[0]:.1f} ms, "
          f"p90 {1000 * q[-1]:.1f} ms, max {1000 * max(firsts):.1f} ms over {runs} requests; "
          f"50 tokens median {1000 * statistics.median(totals):.0f} ms")
    return firsts


def wait(url):
    while (job := httpx.get(f"{url}/training_status").json())["state"] in ("queued", "running"):
        time.sleep(0.2)
    return job


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--book", default=f"{ROOT}/books/example_book.txt")
    args = p.parse_args(argv)
    home, port = tempfile.mkdtemp(prefix="azr-bench-"), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port), "--home", home], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        httpx.post(f"{url}/create_model", json={"name": "small", "preset": "small"}).raise_for_status()
        with open(args.book, "rb") as f:
            httpx.post(f"{url}/upload_book", files={"file": ("book.txt", f.read())}, timeout=120).raise_for_status()
        httpx.post(f"{url}/train", json={"model": "small", "book": "book", "steps": 20, "batch_size": 8,
                                         "warmup_steps": 5}).raise_for_status()
        job = wait(url)
        print(f"trained: {job['state']}, {job['step']} steps, val bpb {job.get('val_bpb')}, device {httpx.get(url + '/health').json()['device']}")
        f, t = first_token(url, {"model": "small", "prompt": "Once upon a time", "max_new_tokens": 50, "seed": 0})
        print(f"cold (model loaded from disk on this request): first token {1000 * f:.1f} ms")
        measure(url, args.runs, "warm, idle server")
        httpx.post(f"{url}/train", json={"model": "small", "book": "book", "steps": 100000, "batch_size": 8}).raise_for_status()
        while httpx.get(f"{url}/training_status").json()["state"] != "running":
            time.sleep(0.2)
        measure(url, args.runs, "warm, while a training job runs")
        httpx.post(f"{url}/stop_training")
        wait(url)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
