"""The hostile run's two ends (bench/hostile_run.py): the live server it attacks, and the check
after the run, which opens every object in the home with the project's own loaders."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from app import records  # the project's own loaders: the check after the run is their one use here
from app.store import Store
from files import load_tensors

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the store, afterwards


def check_store(run):
    """With the server down: open every object with the project's loaders."""
    home = run.server.home
    s, corrupt, checked = Store(home), [], Counter()

    def opens(what, fn):
        checked[what.split(" ")[0]] += 1
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- any failure to open is the finding
            corrupt.append(f"{what}: {str(e)[:160]}")

    planted_dirs = {p.parent for p in run.planted if "models" in p.parts}
    for d in sorted((home / "models").iterdir()):
        if d in planted_dirs:
            continue
        name = d.name
        opens(f"model {name}", lambda: s.load_model(name))
        if (d / "tokenizer.json").exists():
            opens(f"tokenizer {name}", lambda: s.tokenizer(name))
        versions = []
        opens(f"lineage {name}", lambda: versions.extend(s.lineage(name).get("versions", [])))
        for v in versions:
            opens(f"version {name}/{v['version']}", lambda v=v: s.load_model(name, version=v["version"]))
        for a in (d / "adapters").glob("*") if (d / "adapters").exists() else []:
            # its own files only: an adapter of weights trained further since is refused by design
            opens(f"adapter {name}/{a.name}", lambda a=a: [s.adapters.info(name, a.name)] +
                  [load_tensors(w) for w in a.glob("*.safetensors")])
    for p in sorted((home / "books").glob("*.txt")):
        if p.is_file() and p not in run.planted:
            opens(f"book {p.stem}", lambda p=p: check_book(s, p.stem))
    for p in sorted((home / "checkpoints").glob("*/step_*.safetensors")):
        if p not in run.torn:
            opens(f"checkpoint {p.parent.name}/{p.name}", lambda p=p: load_tensors(p))
    for p in sorted((home / "checkpoints").glob("*/run.json")):
        opens(f"run {p.parent.name}", lambda p=p: records.load(p, records.Run))
    for p in sorted((home / "jobs").glob("*.json")):
        if p not in run.planted:
            opens(f"job {p.name}", lambda p=p: records.load(p, records.Job))
    lost = [f"{kind} {n}" for kind, names in run.keep.items() for n in names
            if not ((home / kind / n).is_dir() if kind == "models" else (home / kind / f"{n}.txt").is_file())]
    lost += [f"damaged file {p.relative_to(home)} changed or gone" for p, b in run.planted.items()
             if not (p.is_file() and p.read_bytes() == b)]
    leftovers = [str(p.relative_to(home)) for p in home.rglob("*") if ".tmp" in p.name or p.name.startswith("azr-")]
    leftovers += [f"beside the home: {p.name}" for p in home.parent.iterdir() if p not in (home, run.server.log)]
    return dict(checked=checked, corrupt=corrupt, lost=lost, leftovers=leftovers,
                tracebacks=run.server.log.read_text(errors="replace").count("Traceback"))


def check_book(s, name):
    info, text = s.books.info(name), s.books.text(name)
    if hashlib.sha256(text.encode()).hexdigest() != info["sha256"]:
        raise ValueError("text does not match its recorded sha256")


# ----------------------------------------------------------------------------- the server


class Server:
    """`python server.py` on a free 127.0.0.1 port; the same port and home across restarts."""

    def __init__(self, home, log):
        self.home, self.log, self.proc = home, log, None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout=120):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--home", str(self.home),
                                          "--port", str(self.port)], cwd=ROOT, stdout=log, stderr=log,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {timeout} s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

