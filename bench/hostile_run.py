"""A hostile run against a live server: everything a careless user, a broken disk and another
web page can throw at `python server.py`, at once, then a count of what survived.

    python -m bench.hostile_run              # the full run (several minutes)
    python -m bench.hostile_run --quick      # every phase once, small counts (about half a minute)
    python -m bench.hostile_run --kills 17 --parallel 50

It is a black box test: it starts `python server.py --home TMP --port FREE` on 127.0.0.1, talks
to it only over HTTP, and reads the server's own OpenAPI description to know what to attack, so a
field added tomorrow is attacked tomorrow without an edit here. The phases, each bounded in count
and time:

1. hostile names (path tricks, unicode, huge, empty) in every field that names a stored thing;
2. bad numbers (out of bounds, NaN, infinity, a fraction for a whole number) in every numeric field;
3. another site's page: writes with a foreign Origin/Referer, and DNS-rebinding Host headers;
4. generations whose clients hang up after a second;
5. creates, deletes, uploads, rollbacks and generations of the same names, in parallel;
6. damaged files of every kind written into the home, then a restart;
7. kill -9 of the server mid-training, restart, resume (once after tearing the newest checkpoint),
   with writes in flight at each kill.

Then, with the server stopped, every object in the home is opened with the project's own loaders
(the one import of project code): each model, version, adapter, book, checkpoint, run and job
file must load, nothing acknowledged may be missing, and no temp file may be left. Any 5xx is a
finding; so is an invalid name or number that is accepted, a cross-site write that is not refused,
a resume that does not start at its checkpoint, and a lost or unreadable object. The figures of
the last full run are in RELIABILITY.md.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from bench/: the project's modules live one folder up
from app import records  # noqa: E402 -- the project's own loaders, for the check after the run, and its name rule
from files import load_tensors  # noqa: E402
from app.names import NAME_RE  # noqa: E402
from app.store import Store  # noqa: E402

TINY = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32)
FAST_TRAIN = dict(batch_size=8, eval_every=10, eval_batches=2, warmup_steps=5, compile="off", sample_tokens=0)
EVIL = "http://evil.example"
# what a request body needs to be cheap: only fields the schema has are set
CHEAP = dict(max_new_tokens=2, max_tokens=2, steps=2, windows=1, bars=2, compile="off", n=1)


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="azr-hostile-"))
    run = HostileRun(tmp, args)
    try:
        run.all_phases()
    finally:
        run.server.stop()
        report = run.check_store()
        print_table(run, report, time.time() - t0)
        if args.keep:
            print(f"home kept: {run.server.home}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if run.tally.findings or report["lost"] or report["corrupt"] or report["leftovers"] else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every phase once, with small counts")
    p.add_argument("--parallel", type=int, default=None, help="requests in flight at once (10-50; default 32, quick 10)")
    p.add_argument("--kills", type=int, default=None, help="kill -9 of the server mid-training (default 17, quick 1)")
    p.add_argument("--abandoned", type=int, default=None, help="generations whose clients leave (default 40, quick 5)")
    p.add_argument("--race-rounds", type=int, default=None, help="rounds of 50 racing writes (default 10, quick 1)")
    p.add_argument("--names", type=int, default=None, help="hostile names tried per field (default all, quick 8)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting phases after this (default 9, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temp home (and the server log) for a look")
    a = p.parse_args(argv)
    full = dict(parallel=32, kills=17, abandoned=40, race_rounds=10, names=None, max_minutes=9.0)
    quick = dict(parallel=10, kills=1, abandoned=5, race_rounds=1, names=8, max_minutes=2.0)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.parallel = min(max(a.parallel, 10), 50)
    return a


class HostileRun:
    def __init__(self, tmp, args):
        self.args, self.rng = args, random.Random(args.seed)
        self.server = Server(tmp / "home", tmp / "server.log")
        self.tally = Tally()
        self.kills, self.resumes = 0, []  # (newest intact checkpoint, step resumed at, warned if torn, killed on time)
        self.keep = {"models": {"t"}, "books": {"bk"}}  # acknowledged objects nobody deletes
        self.planted = {}  # path -> bytes of each damaged file we wrote
        self.torn = set()  # checkpoints we cut in half
        self.deadline = time.time() + 60 * args.max_minutes

    def all_phases(self):
        self.server.start()
        self.client = httpx.Client(base_url=self.server.url, timeout=60,
                                   limits=httpx.Limits(max_connections=self.args.parallel + 8))
        self.spec = self.client.get("/openapi.json").json()
        self.setup()
        for phase in (self.hostile_names, self.bad_numbers, self.other_sites, self.abandoned_generations,
                      self.races, self.damaged_files, self.kill_cycles):
            if time.time() > self.deadline:
                print(f"time is up: skipped {phase.__name__}", flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {phase.__name__}", flush=True)
            phase()
            self.wait_idle()

    # ------------------------------------------------------------------------- setup

    def setup(self):
        """A book made here, a tiny model trained a few steps (a tokenizer, a version), a LoRA
        adapter, and witnesses: models and books that nothing later touches on purpose."""
        c = self.client
        expect(c.post("/upload_book", files={"file": ("bk.txt", make_book(self.rng).encode())}), 201)
        expect(c.post("/create_model", json={"name": "t", **TINY}), 201)
        expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 12, **FAST_TRAIN}), 202)
        self.wait_idle(stop=False)
        expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 4, "mode": "lora", "adapter": "ad",
                                      **FAST_TRAIN}), 202)
        self.wait_idle(stop=False)
        if self.status().get("state") != "done" or not c.get("/models/t").json().get("versions"):
            raise RuntimeError(f"setup: the tiny model did not train: {self.status().get('error')}")
        for i in range(3):
            expect(c.post("/create_model", json={"name": f"w{i}", **TINY, "seed": i}), 201)
            expect(c.post("/upload_book", files={"file": (f"wb{i}.txt", make_book(self.rng, 200).encode())}), 201)
            self.keep["models"].add(f"w{i}")
            self.keep["books"].add(f"wb{i}")

    # ------------------------------------------------------------------------- 1. hostile names

    def hostile_names(self):
        """Each hostile name in each name slot of each route; the other fields stay valid, so the
        name is what the server has to judge. An invalid name must be a 4xx; a valid odd one
        ("-", "con") may do what it says, never a 5xx."""
        names = hostile_names()[:self.args.names]
        jobs = []
        for method, path, op in operations(self.spec):
            for slot, where in name_slots(self.spec, path, op):
                # a URL holds at most 64 KiB (httpx refuses to send more): the longest names go in bodies
                jobs += [(method, path, op, slot, bad) for bad in names if where == "body" or len(bad) < 2**15]
        for bad in names:  # the upload form: its name field and its file name
            jobs.append(("POST", "/upload_book", None, "name", bad))
            jobs.append(("POST", "/upload_book", None, "filename", bad))
        self.fire("hostile names", [lambda j=j: self.send_name(*j) for j in jobs])
        self.delete_odd_objects()

    def send_name(self, method, path, op, slot, bad):
        if path == "/upload_book":
            form = {"name": bad} if slot == "name" else {}
            fname = f"{bad}.txt" if slot == "filename" else "ok.txt"
            r = send(self.client, "POST", path, files={"file": (fname, make_book(random.Random(1), 60).encode())},
                     data=form)
            stored = r.json().get("name", "") if answer(r) and r.status_code == 201 else ""
            # the file name, or an empty name field, only suggests a name: a safe one may be made of it
            return r, ((slot == "filename" or bad == "") and valid_name(stored)) or judge_name(r, bad)
        r = self.send_op(method, path, op, override={slot: bad})
        if bad == "" and slot not in required_fields(self.spec, op) and answer(r) and r.status_code < 300:
            return r, True  # an optional name left empty means "none" (no adapter, no book)
        return r, judge_name(r, bad)

    def delete_odd_objects(self):
        """Valid odd names ("-", "con") may have made models and books: drop them so the later
        phases count only their own."""
        for kind, route in (("models", "/models"), ("books", "/books")):
            listed = self.client.get(route).json()
            for item in listed if isinstance(listed, list) else listed.get(kind, []):
                name = item["name"]
                if name not in self.keep[kind] and name != "ad":
                    self.client.delete(f"{route}/{quote(name, safe='')}")

    # ------------------------------------------------------------------------- 2. bad numbers

    def bad_numbers(self):
        """Each numeric field of each route (body and query), each value outside what its schema
        allows: must be a 4xx."""
        jobs = []
        for method, path, op in operations(self.spec):
            for field, prop, where in numeric_fields(self.spec, op):
                jobs += [(method, path, op, field, value, where, True) for value in bad_values(prop)]
                jobs += [(method, path, op, field, value, where, False) for value in odd_values(prop)]
        self.fire("bad numbers", [lambda j=j: self.send_number(*j) for j in jobs if j[-1]])
        self.fire("odd numbers", [lambda j=j: self.send_number(*j) for j in jobs if not j[-1]])

    def send_number(self, method, path, op, field, value, where, bad):
        """A value the schema forbids must be a 4xx; one it leaves open (-1 where no minimum is
        set, 10^30 where no maximum is) must not be a 5xx, and is noted when accepted."""
        sent = json.dumps(value) if where == "query" else value  # NaN, Infinity, 1e+30 as a URL carries them
        r = self.send_op(method, path, op, override={field: sent})
        if not bad and answer(r) and r.status_code < 300:
            self.tally.accepted.append(f"{method} {path} {field}={json.dumps(value)}")
        return r, answer(r) and (400 <= r.status_code < 500 if bad else r.status_code < 500)

    # ------------------------------------------------------------------------- 3. other sites

    def other_sites(self):
        """Every write with another site's Origin/Referer/Sec-Fetch-Site, the heavy GET too; reads
        with a Host header a rebinding DNS name would send. Each must be a 403."""
        port = self.server.port
        senders = [{"Origin": EVIL}, {"Origin": "null"}, {"Referer": f"{EVIL}/page.html"},
                   {"Origin": f"http://127.0.0.1:{port}.evil.example"}, {"Sec-Fetch-Site": "cross-site"}]
        jobs = []
        for method, path, op in operations(self.spec):
            if method != "GET" or path.endswith("/step_time"):
                jobs += [lambda m=method, p=path, o=op, h=h: self.refused(m, p, o, h) for h in senders]
        self.fire("cross-site writes", jobs)
        hosts = ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "127.0.0.1:1",
                 f"localhost.evil.example:{port}", f"192.168.7.7:{port}", f"[::2]:{port}", ""]
        reads = [p for m, p, o in operations(self.spec) if m == "GET" and "{" not in p and p != "/training_status"]
        jobs = [lambda h=h, p=p: self.refused("GET", p, None, {"Host": h}) for h in hosts for p in reads[:4]]
        self.fire("rebinding Hosts", jobs)

    def refused(self, method, path, op, headers):
        r = self.send_op(method, path, op, headers=headers) if op else send(self.client, method, path, headers=headers)
        return r, answer(r) and r.status_code == 403

    # ------------------------------------------------------------------------- 4. abandoned work

    def abandoned_generations(self):
        """Long generations whose clients hang up after a second: /health must answer at once
        meanwhile, and the work must stop soon after (none left generating)."""
        def leave():
            r = send(self.client, "POST", "/generate", body={"model": "t", "max_new_tokens": 10000, "seed": 1},
                     timeout=1.0)
            return r, isinstance(r, httpx.TimeoutException) or (answer(r) and r.status_code == 429)
        threads = [threading.Thread(target=lambda: self.tally.add("abandoned generations", *leave()))
                   for _ in range(self.args.abandoned)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        health = [self.timed_health() for _ in range(10)]
        for t in threads:
            t.join()
        gone = self.wait_until(lambda: self.client.get("/health").json().get("generating") == 0, 60)
        self.tally.note("abandoned: /health max s", round(max(health), 2))
        self.tally.note("abandoned: all stopped", gone)
        if not gone or max(health) > 1.0:
            self.tally.finding(f"abandoned generations: /health took {max(health):.2f} s, all stopped: {gone}")

    def timed_health(self):
        t = time.time()
        r = send(self.client, "GET", "/health", timeout=10)
        self.tally.add("health while busy", r, answer(r) and r.status_code == 200)
        return time.time() - t

    # ------------------------------------------------------------------------- 5. races

    def races(self):
        for _ in range(self.args.race_rounds):
            if time.time() > self.deadline:
                break
            self.fire("create/delete/generate races", self.race_batch(50))

    def race_batch(self, n):
        """n requests on four model names and four book names at once: any answer but a 5xx."""
        def one(i):
            m, b = f"r{i % 4}", f"rb{i % 4}"
            return self.rng.choice([
                lambda: send(self.client, "POST", "/create_model", body={"name": m, **TINY}),
                lambda: send(self.client, "DELETE", f"/models/{m}"),
                lambda: send(self.client, "POST", "/generate", body={"model": m, "max_new_tokens": 4}),
                lambda: send(self.client, "POST", "/generate", body={"model": "t", "max_new_tokens": 4, "seed": i}),
                lambda: send(self.client, "GET", f"/models/{m}"),
                lambda: send(self.client, "POST", "/upload_book",
                             files={"file": (f"{b}.txt", make_book(random.Random(i), 100).encode())}),
                lambda: send(self.client, "DELETE", f"/books/{b}"),
                lambda: send(self.client, "POST", "/models/t/rollback", body={"version": "v001"}),
                lambda: send(self.client, "GET", "/models"),
                lambda: send(self.client, "GET", "/books"),
            ])
        return [lambda f=one(i): no_5xx(f()) for i in range(n)]

    # ------------------------------------------------------------------------- 6. damaged files

    def damaged_files(self):
        """Files of the right name and the wrong shape, written while the server runs; then a
        restart. Listings must answer 200 and name each damaged record; nothing may repair,
        move or delete them behind our back (checked at the end, byte for byte)."""
        home = self.server.home
        t_dir = home / "models" / "t"
        for name, file, content in [("dmg_config", "config.json", b"null"), ("dmg_lineage", "lineage.json", b"[]"),
                                    ("dmg_versions", "lineage.json", None)]:
            shutil.copytree(t_dir, home / "models" / name, ignore=shutil.ignore_patterns("versions", "adapters"))
            if content is None:  # a whole lineage whose versions list holds an integer
                lin = json.loads((t_dir / "lineage.json").read_text())
                content = json.dumps({**lin, "versions": [3]}).encode()
            self.plant(home / "models" / name / file, content)
        self.plant(home / "books" / "dmg_book.txt", b"a book whose info is garbage\n")
        self.plant(home / "books" / "dmg_book.json", b"{not json \x00\xff")
        (home / "books" / "x.txt").mkdir()
        self.plant(home / "jobs" / "dmg_job.json", b"[]")
        self.check_damaged_listed("damaged files (live)")
        self.server.kill()
        self.server.start()
        self.check_damaged_listed("damaged files (after restart)")

    def plant(self, path, content):
        path.write_bytes(content)
        self.planted[path] = content

    def check_damaged_listed(self, group):
        c = self.client
        for route in ("/health", "/models", "/books", "/training_status", "/v1/models", "/models/t", "/books/bk"):
            r = send(c, "GET", route)
            self.tally.add(group, r, answer(r) and r.status_code == 200)
        h = c.get("/health").json()
        listed = (set(h.get("damaged", [])) >= {"dmg_config", "dmg_lineage", "dmg_versions"}
                  and "dmg_book" in h.get("damaged_books", []))
        self.tally.add(group, None, listed, what="damaged listed in /health")
        for method, route, body in [("GET", "/models/dmg_config", None), ("GET", "/models/dmg_lineage", None),
                                    ("POST", "/generate", {"model": "dmg_versions", "max_new_tokens": 2}),
                                    ("GET", "/books/dmg_book", None), ("GET", "/books/x.txt", None)]:
            r = send(c, method, route, body=body)
            # a damaged model is the one place a 500 is the design: "X is damaged (...); what to do"
            self.tally.add("requests on damaged objects", r, answer(r) and (r.status_code < 500 or "damaged" in r.text))

    # ------------------------------------------------------------------------- 7. kill -9

    def kill_cycles(self):
        """Train, kill -9 mid-run with racing writes in flight, restart, resume: each resume must
        start at the newest intact checkpoint. Before one resume the newest checkpoint is torn
        (cut in half): that resume must start at the one before, and say so."""
        c = self.client
        expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 100000, "checkpoint_every": 5,
                                      "patience": 0, **FAST_TRAIN}), 202)  # no early stop: a run to kill
        torn_at = max(1, self.args.kills // 2)
        for k in range(1, self.args.kills + 1):
            if time.time() > self.deadline:
                break
            target = self.status().get("step", 0) + self.rng.randint(3, 12)
            reached = self.wait_until(lambda: self.status().get("step", 0) >= target, 90)
            if self.status().get("state") not in ("queued", "running"):
                self.tally.finding(f"kill -9: the job is {self.status().get('state')}, not running, before kill {k}")
                break
            racing = threading.Thread(target=self.fire, args=("races during kill -9", self.race_batch(30)))
            racing.start()
            time.sleep(self.rng.uniform(0.2, 1.5))
            self.server.kill()
            self.kills += 1
            racing.join()
            expected, torn = self.newest_checkpoint(tear=(k == torn_at))
            self.server.start()
            r = send(c, "GET", "/health")
            self.tally.add("restart after kill -9", r, answer(r) and r.status_code == 200)
            state = self.status().get("state")
            self.tally.add("restart after kill -9", None, state == "interrupted", what=f"job {state} after kill")
            self.resume(expected, torn, reached)
        send(c, "POST", "/stop_training")
        self.check_rows_once("t")

    def resume(self, expected, torn, reached):
        seq = self.status().get("seq", 0)
        r = send(self.client, "POST", "/resume_training")
        self.tally.add("resume after kill -9", r, answer(r) and r.status_code == 200)
        start = {}
        def started():
            nonlocal start
            events = self.client.get("/training_status", params={"since": seq}).json().get("events", [])
            start = next((e for e in events if e["type"] == "start"), {})
            return bool(start) or self.status().get("state") in ("failed", "done")
        self.wait_until(started, 60)
        warned = any("damaged" in str(e.get("message", "")) for e in
                     self.client.get("/training_status", params={"since": seq}).json().get("events", []))
        self.resumes.append((expected, start.get("step"), warned if torn else None, reached))
        ok = start.get("step") == expected and (warned or not torn)
        self.tally.add("resume after kill -9", None, ok,
                       what=f"resume at step {start.get('step')}, newest intact checkpoint {expected}, torn: {torn}")

    def newest_checkpoint(self, tear):
        """The step of the newest checkpoint (with the server down); with `tear`, cut that file in
        half first, which leaves the one before it as the newest intact."""
        steps = sorted(int(p.stem.split("_")[1]) for p in (self.server.home / "checkpoints" / "t").glob("step_*.safetensors"))
        if tear and len(steps) >= 2:
            path = self.server.home / "checkpoints" / "t" / f"step_{steps[-1]:08d}.safetensors"
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
            self.torn.add(path)
            return steps[-2], True
        return (steps[-1] if steps else 0), False

    def check_rows_once(self, name):
        """Exact resume leaves one metrics row per step of each run: the rows a killed run wrote
        past its checkpoint are dropped when it resumes."""
        self.wait_idle()
        rows = self.client.get(f"/models/{name}/metrics").json().get("rows", [])
        per_run = Counter((r.get("run"), r.get("step")) for r in rows if "step" in r)
        twice = sum(1 for n in per_run.values() if n > 1)
        self.tally.add("resume after kill -9", None, twice == 0, what=f"{twice} steps with more than one row")

    # ------------------------------------------------------------------------- plumbing

    def fire(self, group, jobs):
        """Run callables returning (response, as_expected), `parallel` at a time."""
        with ThreadPoolExecutor(self.args.parallel) as pool:
            for r, ok in pool.map(lambda f: f(), jobs):
                self.tally.add(group, r, ok)

    def send_op(self, method, path, op, override=None, headers=None):
        """One request to a route, every required field filled with a valid value, then `override`."""
        path_args, query, body = fill_request(self.spec, path, op, override or {})
        url = path.format(**{k: as_segment(v) for k, v in path_args.items()})
        return send(self.client, method, url, params=query, body=body, headers=headers)

    def status(self):
        r = send(self.client, "GET", "/training_status")
        return r.json() if answer(r) and r.status_code == 200 else {}

    def wait_idle(self, timeout=120, stop=True):
        if stop:
            send(self.client, "POST", "/stop_training")
        self.wait_until(lambda: self.status().get("state") not in ("queued", "running"), timeout)

    def wait_until(self, condition, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if condition():
                return True
            time.sleep(0.2)
        return False

    # ------------------------------------------------------------------------- the store, afterwards

    def check_store(self):
        """With the server down: open every object with the project's loaders."""
        home = self.server.home
        s, corrupt, checked = Store(home), [], Counter()

        def opens(what, fn):
            checked[what.split(" ")[0]] += 1
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- any failure to open is the finding
                corrupt.append(f"{what}: {str(e)[:160]}")

        planted_dirs = {p.parent for p in self.planted if "models" in p.parts}
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
            if p.is_file() and p not in self.planted:
                opens(f"book {p.stem}", lambda p=p: check_book(s, p.stem))
        for p in sorted((home / "checkpoints").glob("*/step_*.safetensors")):
            if p not in self.torn:
                opens(f"checkpoint {p.parent.name}/{p.name}", lambda p=p: load_tensors(p))
        for p in sorted((home / "checkpoints").glob("*/run.json")):
            opens(f"run {p.parent.name}", lambda p=p: records.load(p, records.Run))
        for p in sorted((home / "jobs").glob("*.json")):
            if p not in self.planted:
                opens(f"job {p.name}", lambda p=p: records.load(p, records.Job))
        lost = [f"{kind} {n}" for kind, names in self.keep.items() for n in names
                if not ((home / kind / n).is_dir() if kind == "models" else (home / kind / f"{n}.txt").is_file())]
        lost += [f"damaged file {p.relative_to(home)} changed or gone" for p, b in self.planted.items()
                 if not (p.is_file() and p.read_bytes() == b)]
        leftovers = [str(p.relative_to(home)) for p in home.rglob("*") if ".tmp" in p.name or p.name.startswith("azr-")]
        leftovers += [f"beside the home: {p.name}" for p in home.parent.iterdir() if p not in (home, self.server.log)]
        return dict(checked=checked, corrupt=corrupt, lost=lost, leftovers=leftovers,
                    tracebacks=self.server.log.read_text(errors="replace").count("Traceback"))



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


# ----------------------------------------------------------------------------- requests and answers


def send(client, method, url, params=None, body=None, headers=None, files=None, data=None, timeout=60):
    """One request; a transport error is returned, not raised (a killed server is expected).
    The body is encoded here so that NaN and Infinity can be sent, as a careless client would."""
    content, headers = None, dict(headers or {})
    if body is not None:
        content = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    try:
        return client.request(method, url, params=params, content=content, headers=headers, files=files, data=data,
                              timeout=timeout)
    except httpx.HTTPError as e:
        return e


def as_segment(name):
    """A name as one path segment on the wire: every reserved byte escaped, dots too (a client
    would otherwise resolve "/models/t/adapters/.." to "/models/t" before sending it)."""
    return quote(str(name), safe="").replace(".", "%2E")


def answer(r):
    return isinstance(r, httpx.Response)


def expect(r, status):
    if r.status_code != status:
        raise RuntimeError(f"setup: {r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r


def no_5xx(r):
    return r, not answer(r) or r.status_code < 500


def judge_name(r, bad):
    """An invalid name must be refused (4xx); a valid odd one may succeed; neither may be a 5xx."""
    if not answer(r):
        return False
    if bad == "" and r.status_code in (307, 404, 405):  # no segment at all: the URL names another route
        return True
    return 400 <= r.status_code < 500 if not valid_name(bad) else r.status_code < 500


def valid_name(name):
    return bool(NAME_RE.fullmatch(name))


class Tally:
    """Answers counted per group; each answer that is not as expected is a finding."""

    def __init__(self):
        self.counts = defaultdict(Counter)
        self.findings, self.notes, self.accepted = [], {}, []
        self.lock = threading.Lock()

    def add(self, group, r, ok, what=None):
        with self.lock:
            c = self.counts[group]
            if r is None:
                c["checks"] += 1
            elif not answer(r):
                c["no answer"] += 1
            else:
                c["requests"] += 1
                c[f"{r.status_code // 100}xx"] += 1
            c["as expected"] += bool(ok)
            if not ok:
                self.finding(f"{group}: {what or describe(r)}")

    def finding(self, text):
        self.findings.append(text)

    def note(self, key, value):
        self.notes[key] = value


def describe(r):
    if not answer(r):
        return f"no answer: {type(r).__name__} {str(r)[:200]}"
    return f"{r.request.method} {str(r.request.url)[:160]} -> {r.status_code} {r.text[:200]}"


# ----------------------------------------------------------------------------- reading the OpenAPI description


NAME_KINDS = {"name", "out", "model", "book", "adapter", "version"}  # the things the store keeps by name


def operations(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def name_kind(field):
    """"model_a" -> "model", "books" -> "book": a field names a stored thing if its stem is one."""
    stem = re.sub(r"_[ab]$", "", field)
    stem = stem[:-1] if stem.endswith("s") else stem
    return stem if stem in NAME_KINDS else None


def fields_of(spec, op):
    """(field, schema, where) of every parameter and JSON body field of a route."""
    for p in op.get("parameters", []):
        yield p["name"], p.get("schema", {}), p["in"]
    for f, prop in body_props(spec, op).items():
        yield f, prop, "body"


def body_props(spec, op):
    content = (op or {}).get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    schema = resolve(spec, schema) if schema else {}
    return schema.get("properties", {})


def resolve(spec, schema):
    """Follow $ref, and take the non-null branch of anyOf."""
    if "anyOf" in schema:
        schema = {**schema, **next(s for s in schema["anyOf"] if s.get("type") != "null")}
        schema.pop("anyOf")
    if "$ref" in schema:
        return resolve(spec, spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    return schema


def name_slots(spec, path, op):
    return [(f, where) for f, prop, where in fields_of(spec, op)
            if name_kind(f) and resolve(spec, prop).get("type") in ("string", "array")]


def numeric_fields(spec, op):
    return [(f, resolve(spec, prop), where) for f, prop, where in fields_of(spec, op)
            if resolve(spec, prop).get("type") in ("integer", "number") and where in ("body", "query")]


def bad_values(prop):
    """Values this field's schema forbids: past each bound, not finite, a fraction for a whole number."""
    whole = prop.get("type") == "integer"
    lo, hi = prop.get("minimum"), prop.get("maximum")
    values = [float("nan"), float("inf"), float("-inf")]
    values += [int(lo) - 1 if whole else lo - 1] if lo is not None else []
    values += [int(hi) + 1 if whole else hi * 2 + 1] if hi is not None else []
    return values + ([1.5] if whole else [])


def odd_values(prop):
    """Values the schema leaves open but few fields mean: negative, and past any 64-bit number."""
    return ([-1] if prop.get("minimum") is None else []) + ([10**30, 2**63] if prop.get("maximum") is None else [])


def fill_request(spec, path, op, override):
    """(path args, query, body) of a valid, cheap request: required fields filled, CHEAP settings
    where the route has them, then `override`."""
    path_args, query, body = {}, {}, {}
    needed = required_fields(spec, op)
    for field, prop, where in fields_of(spec, op):
        if field in override:
            value = override[field]
        elif field in needed or field in CHEAP or where == "path":
            value = valid_value(spec, field, resolve(spec, prop), where, path)
        else:
            continue
        {"path": path_args, "query": query, "body": body}[where][field] = value
    return path_args, query, (body if body_props(spec, op) else None)


def required_fields(spec, op):
    content = (op or {}).get("requestBody", {}).get("content", {}).get("application/json")
    schema = resolve(spec, content["schema"]) if content else {}
    return set(schema.get("required", [])) | {q["name"] for q in op.get("parameters", []) if q.get("required")}


def valid_value(spec, field, prop, where, path):
    """The tiny model "t", its book "bk", adapter "ad" and version "v001" for the names; a new
    name where one is to be made; CHEAP or the schema's own default for the rest."""
    kind = name_kind(field)
    if kind:
        in_path = {"name": "bk" if path.startswith("/books") else "t"}
        value = (in_path if where == "path" else {}).get(kind) or {
            "model": "t", "book": "bk", "adapter": "ad", "version": "v001", "name": "fresh",
            "out": "fresh"}[kind]
        return [value] if prop.get("type") == "array" else value
    return CHEAP[field] if field in CHEAP else sample_value(spec, prop)


def sample_value(spec, prop):
    prop = resolve(spec, prop)
    if "enum" in prop:
        return prop["enum"][0]
    if "default" in prop:
        return prop["default"]
    t = prop.get("type")
    if t == "object":
        return {f: sample_value(spec, p) for f, p in prop.get("properties", {}).items() if f in prop.get("required", [])}
    if t == "array":
        return [sample_value(spec, prop.get("items", {}))]
    return {"string": "hi", "integer": 1, "number": 1.0, "boolean": False}.get(t, "hi")


def hostile_names():
    """Names that try to become a path, hide in unicode, or break a parser. Some are valid by the
    store's rule ("-", "con"): those may succeed; the rest must be refused."""
    return ["..", ".", "../../etc/passwd", "..\\..\\windows", "/etc/passwd", "a/b", "a\\b", "%2e%2e%2f", "a\x00b",
            "\x00", "", " ", "t ", " t", "t\n", "t\r\nX-Injected: 1", "x" * 65, "x" * 5000, "x" * 100_000,
            "Модель", "名前", "ｆｕｌｌｗｉｄｔｈ", "a\u202eb", "a\u200bb", "😀", "e\u0301", ".hidden", "~root",
            "$HOME", "name.json", "t.safetensors", "<script>", "'; drop table", "-", "--help", "con", "NUL"]


def make_book(rng, lines=800):
    words = ("the cat sat on a mat while an old river ran past green hills and quiet towns under a grey sky "
             "before the long winter came down from the north").split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))


# ----------------------------------------------------------------------------- the table


def print_table(run, report, wall_s):
    print("\n| case | requests | 2xx | 4xx | 5xx | no answer | checks | as expected |")
    print("|---|---|---|---|---|---|---|---|")
    total = Counter()
    for group, c in run.tally.counts.items():
        total.update(c)
        print(f"| {group} | {c['requests']} | {c['2xx']} | {c['4xx']} | {c['5xx']} | {c['no answer']} | "
              f"{c['checks']} | {c['as expected']}/{c['requests'] + c['no answer'] + c['checks']} |")
    print(f"| **total** | {total['requests']} | {total['2xx']} | {total['4xx']} | {total['5xx']} | "
          f"{total['no answer']} | {total['checks']} | {total['as expected']}/"
          f"{total['requests'] + total['no answer'] + total['checks']} |")
    resumed = sum(1 for e, s, *_ in run.resumes if e == s)
    print(f"\nkill -9 of the server: {run.kills}; resumed at the newest intact checkpoint: {resumed}/{len(run.resumes)} "
          f"(checkpoint steps {[e for e, *_ in run.resumes]}; torn newest checkpoint: "
          f"{sum(1 for r in run.resumes if r[2] is not None)}, warned: {sum(1 for r in run.resumes if r[2])})")
    print(f"damaged files planted: {len(run.planted) + 1} (and one torn checkpoint)")
    print(f"store objects opened: {sum(report['checked'].values())} ({dict(report['checked'])}); "
          f"lost: {len(report['lost'])}; corrupt: {len(report['corrupt'])}; temp files left: {len(report['leftovers'])}")
    print(f"server tracebacks in its log: {report['tracebacks']}; notes: {run.tally.notes}; wall: {wall_s:.0f} s")
    for line in report["lost"] + report["corrupt"] + report["leftovers"]:
        print(f"  store: {line}")
    print(f"odd numbers accepted (the schema allows them; 2xx): {len(run.tally.accepted)}")
    for a in run.tally.accepted:
        print(f"  ~ {a}")
    print(f"findings: {len(run.tally.findings)}")
    for f in run.tally.findings[:40]:
        print(f"  - {f}")


if __name__ == "__main__":
    sys.exit(main())
