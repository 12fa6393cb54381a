"""The attacks of the hostile run (bench/hostile_run.py), one function per phase, each taking the
run (its client, the server's OpenAPI description, the tally) and each bounded in count and time:
first a setup (a book, a tiny model, an adapter, witnesses nobody touches), then

1. hostile names in every field that names a stored thing;
2. bad numbers in every numeric field;
3. another site's page: cross-site writes, DNS-rebinding Host headers;
4. generations whose clients hang up after a second;
5. creates, deletes, uploads, rollbacks and generations of the same names, in parallel;
6. damaged files written into the live home, then a restart;
7. kill -9 of the server mid-training, restart, resume.
"""

import json
import random
import shutil
import threading
import time
from collections import Counter
from urllib.parse import quote

import httpx

from bench.hostile_http import answer, expect, judge_name, no_5xx, send, valid_name
from bench.hostile_spec import (bad_values, name_slots, numeric_fields, odd_values, operations, required_fields,
                                tricky_names)

TINY = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32)
FAST_TRAIN = dict(batch_size=8, eval_every=10, eval_batches=2, warmup_steps=5, compile="off", sample_tokens=0)
EVIL = "http://evil.example"


# ----------------------------------------------------------------------------- setup


def setup(run):
    """A book made here, a tiny model trained a few steps (a tokenizer, a version), a LoRA
    adapter, and witnesses: models and books that nothing later touches on purpose."""
    c = run.client
    expect(c.post("/upload_book", files={"file": ("bk.txt", make_book(run.rng).encode())}), 201)
    expect(c.post("/create_model", json={"name": "t", **TINY}), 201)
    expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 12, **FAST_TRAIN}), 202)
    run.wait_idle(stop=False)
    expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 4, "mode": "lora", "adapter": "ad",
                                  **FAST_TRAIN}), 202)
    run.wait_idle(stop=False)
    if run.status().get("state") != "done" or not c.get("/models/t").json().get("versions"):
        raise RuntimeError(f"setup: the tiny model did not train: {run.status().get('error')}")
    for i in range(3):
        expect(c.post("/create_model", json={"name": f"w{i}", **TINY, "seed": i}), 201)
        expect(c.post("/upload_book", files={"file": (f"wb{i}.txt", make_book(run.rng, 200).encode())}), 201)
        run.keep["models"].add(f"w{i}")
        run.keep["books"].add(f"wb{i}")


# ----------------------------------------------------------------------------- 1. hostile names


def hostile_names(run):
    """Each hostile name in each name slot of each route; the other fields stay valid, so the
    name is what the server has to judge. An invalid name must be a 4xx; a valid odd one
    ("-", "con") may do what it says, never a 5xx."""
    names = tricky_names()[:run.args.names]
    jobs = []
    for method, path, op in operations(run.spec):
        for slot, where in name_slots(run.spec, path, op):
            # a URL holds at most 64 KiB (httpx refuses to send more): the longest names go in bodies
            jobs += [(method, path, op, slot, bad) for bad in names if where == "body" or len(bad) < 2**15]
    for bad in names:  # the upload form: its name field and its file name
        jobs.append(("POST", "/upload_book", None, "name", bad))
        jobs.append(("POST", "/upload_book", None, "filename", bad))
    run.fire("hostile names", [lambda j=j: send_name(run, *j) for j in jobs])
    delete_odd_objects(run)


def send_name(run, method, path, op, slot, bad):
    if path == "/upload_book":
        form = {"name": bad} if slot == "name" else {}
        fname = f"{bad}.txt" if slot == "filename" else "ok.txt"
        r = send(run.client, "POST", path, files={"file": (fname, make_book(random.Random(1), 60).encode())},
                 data=form)
        stored = r.json().get("name", "") if answer(r) and r.status_code == 201 else ""
        # the file name, or an empty name field, only suggests a name: a safe one may be made of it
        return r, ((slot == "filename" or bad == "") and valid_name(stored)) or judge_name(r, bad)
    r = run.send_op(method, path, op, override={slot: bad})
    if bad == "" and slot not in required_fields(run.spec, op) and answer(r) and r.status_code < 300:
        return r, True  # an optional name left empty means "none" (no adapter, no book)
    return r, judge_name(r, bad)


def delete_odd_objects(run):
    """Valid odd names ("-", "con") may have made models and books: drop them so the later
    phases count only their own."""
    for kind, route in (("models", "/models"), ("books", "/books")):
        listed = run.client.get(route).json()
        for item in listed if isinstance(listed, list) else listed.get(kind, []):
            name = item["name"]
            if name not in run.keep[kind] and name != "ad":
                run.client.delete(f"{route}/{quote(name, safe='')}")


# ----------------------------------------------------------------------------- 2. bad numbers


def bad_numbers(run):
    """Each numeric field of each route (body and query), each value outside what its schema
    allows: must be a 4xx."""
    jobs = []
    for method, path, op in operations(run.spec):
        for field, prop, where in numeric_fields(run.spec, op):
            jobs += [(method, path, op, field, value, where, True) for value in bad_values(prop)]
            jobs += [(method, path, op, field, value, where, False) for value in odd_values(prop)]
    run.fire("bad numbers", [lambda j=j: send_number(run, *j) for j in jobs if j[-1]])
    run.fire("odd numbers", [lambda j=j: send_number(run, *j) for j in jobs if not j[-1]])


def send_number(run, method, path, op, field, value, where, bad):
    """A value the schema forbids must be a 4xx; one it leaves open (-1 where no minimum is
    set, 10^30 where no maximum is) must not be a 5xx, and is noted when accepted."""
    sent = json.dumps(value) if where == "query" else value  # NaN, Infinity, 1e+30 as a URL carries them
    r = run.send_op(method, path, op, override={field: sent})
    if not bad and answer(r) and r.status_code < 300:
        run.tally.accepted.append(f"{method} {path} {field}={json.dumps(value)}")
    return r, answer(r) and (400 <= r.status_code < 500 if bad else r.status_code < 500)


# ----------------------------------------------------------------------------- 3. other sites


def other_sites(run):
    """Every write with another site's Origin/Referer/Sec-Fetch-Site, the heavy GET too; reads
    with a Host header a rebinding DNS name would send. Each must be a 403."""
    port = run.server.port
    senders = [{"Origin": EVIL}, {"Origin": "null"}, {"Referer": f"{EVIL}/page.html"},
               {"Origin": f"http://127.0.0.1:{port}.evil.example"}, {"Sec-Fetch-Site": "cross-site"}]
    jobs = []
    for method, path, op in operations(run.spec):
        if method != "GET" or path.endswith("/step_time"):
            jobs += [lambda m=method, p=path, o=op, h=h: refused(run, m, p, o, h) for h in senders]
    run.fire("cross-site writes", jobs)
    hosts = ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "127.0.0.1:1",
             f"localhost.evil.example:{port}", f"192.168.7.7:{port}", f"[::2]:{port}", ""]
    reads = [p for m, p, o in operations(run.spec) if m == "GET" and "{" not in p and p != "/training_status"]
    jobs = [lambda h=h, p=p: refused(run, "GET", p, None, {"Host": h}) for h in hosts for p in reads[:4]]
    run.fire("rebinding Hosts", jobs)


def refused(run, method, path, op, headers):
    r = run.send_op(method, path, op, headers=headers) if op else send(run.client, method, path, headers=headers)
    return r, answer(r) and r.status_code == 403


# ----------------------------------------------------------------------------- 4. abandoned work


def abandoned_generations(run):
    """Long generations whose clients hang up after a second: /health must answer at once
    meanwhile, and the work must stop soon after (none left generating)."""
    def leave():
        r = send(run.client, "POST", "/generate", body={"model": "t", "max_new_tokens": 10000, "seed": 1},
                 timeout=1.0)
        return r, isinstance(r, httpx.TimeoutException) or (answer(r) and r.status_code == 429)
    threads = [threading.Thread(target=lambda: run.tally.add("abandoned generations", *leave()))
               for _ in range(run.args.abandoned)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    health = [timed_health(run) for _ in range(10)]
    for t in threads:
        t.join()
    gone = run.wait_until(lambda: run.client.get("/health").json().get("generating") == 0, 60)
    run.tally.note("abandoned: /health max s", round(max(health), 2))
    run.tally.note("abandoned: all stopped", gone)
    if not gone or max(health) > 1.0:
        run.tally.finding(f"abandoned generations: /health took {max(health):.2f} s, all stopped: {gone}")


def timed_health(run):
    t = time.time()
    r = send(run.client, "GET", "/health", timeout=10)
    run.tally.add("health while busy", r, answer(r) and r.status_code == 200)
    return time.time() - t


# ----------------------------------------------------------------------------- 5. races


def races(run):
    for _ in range(run.args.race_rounds):
        if time.time() > run.deadline:
            break
        run.fire("create/delete/generate races", race_batch(run, 50))


def race_batch(run, n):
    """n requests on four model names and four book names at once: any answer but a 5xx."""
    def one(i):
        m, b = f"r{i % 4}", f"rb{i % 4}"
        return run.rng.choice([
            lambda: send(run.client, "POST", "/create_model", body={"name": m, **TINY}),
            lambda: send(run.client, "DELETE", f"/models/{m}"),
            lambda: send(run.client, "POST", "/generate", body={"model": m, "max_new_tokens": 4}),
            lambda: send(run.client, "POST", "/generate", body={"model": "t", "max_new_tokens": 4, "seed": i}),
            lambda: send(run.client, "GET", f"/models/{m}"),
            lambda: send(run.client, "POST", "/upload_book",
                         files={"file": (f"{b}.txt", make_book(random.Random(i), 100).encode())}),
            lambda: send(run.client, "DELETE", f"/books/{b}"),
            lambda: send(run.client, "POST", "/models/t/rollback", body={"version": "v001"}),
            lambda: send(run.client, "GET", "/models"),
            lambda: send(run.client, "GET", "/books"),
        ])
    return [lambda f=one(i): no_5xx(f()) for i in range(n)]


# ----------------------------------------------------------------------------- 6. damaged files


def damaged_files(run):
    """Files of the right name and the wrong shape, written while the server runs; then a
    restart. Listings must answer 200 and name each damaged record; nothing may repair,
    move or delete them behind our back (checked at the end, byte for byte)."""
    home = run.server.home
    t_dir = home / "models" / "t"
    for name, file, content in [("dmg_config", "config.json", b"null"), ("dmg_lineage", "lineage.json", b"[]"),
                                ("dmg_versions", "lineage.json", None)]:
        shutil.copytree(t_dir, home / "models" / name, ignore=shutil.ignore_patterns("versions", "adapters"))
        if content is None:  # a whole lineage whose versions list holds an integer
            lin = json.loads((t_dir / "lineage.json").read_text())
            content = json.dumps({**lin, "versions": [3]}).encode()
        plant(run, home / "models" / name / file, content)
    plant(run, home / "books" / "dmg_book.txt", b"a book whose info is garbage\n")
    plant(run, home / "books" / "dmg_book.json", b"{not json \x00\xff")
    (home / "books" / "x.txt").mkdir()
    plant(run, home / "jobs" / "dmg_job.json", b"[]")
    check_damaged_listed(run, "damaged files (live)")
    run.server.kill()
    run.server.start()
    check_damaged_listed(run, "damaged files (after restart)")


def plant(run, path, content):
    path.write_bytes(content)
    run.planted[path] = content


def check_damaged_listed(run, group):
    c = run.client
    for route in ("/health", "/models", "/books", "/training_status", "/v1/models", "/models/t", "/books/bk"):
        r = send(c, "GET", route)
        run.tally.add(group, r, answer(r) and r.status_code == 200)
    h = c.get("/health").json()
    listed = (set(h.get("damaged", [])) >= {"dmg_config", "dmg_lineage", "dmg_versions"}
              and "dmg_book" in h.get("damaged_books", []))
    run.tally.add(group, None, listed, what="damaged listed in /health")
    for method, route, body in [("GET", "/models/dmg_config", None), ("GET", "/models/dmg_lineage", None),
                                ("POST", "/generate", {"model": "dmg_versions", "max_new_tokens": 2}),
                                ("GET", "/books/dmg_book", None), ("GET", "/books/x.txt", None)]:
        r = send(c, method, route, body=body)
        # a damaged model is the one place a 500 is the design: "X is damaged (...); what to do"
        run.tally.add("requests on damaged objects", r, answer(r) and (r.status_code < 500 or "damaged" in r.text))


# ----------------------------------------------------------------------------- 7. kill -9


def kill_cycles(run):
    """Train, kill -9 mid-run with racing writes in flight, restart, resume: each resume must
    start at the newest intact checkpoint. Before one resume the newest checkpoint is torn
    (cut in half): that resume must start at the one before, and say so."""
    c = run.client
    expect(c.post("/train", json={"model": "t", "book": "bk", "steps": 100000, "checkpoint_every": 5,
                                  "patience": 0, **FAST_TRAIN}), 202)  # no early stop: a run to kill
    torn_at = max(1, run.args.kills // 2)
    for k in range(1, run.args.kills + 1):
        if time.time() > run.deadline:
            break
        target = run.status().get("step", 0) + run.rng.randint(3, 12)
        reached = run.wait_until(lambda: run.status().get("step", 0) >= target, 90)
        if run.status().get("state") not in ("queued", "running"):
            run.tally.finding(f"kill -9: the job is {run.status().get('state')}, not running, before kill {k}")
            break
        racing = threading.Thread(target=run.fire, args=("races during kill -9", race_batch(run, 30)))
        racing.start()
        time.sleep(run.rng.uniform(0.2, 1.5))
        run.server.kill()
        run.kills += 1
        racing.join()
        expected, torn = newest_checkpoint(run, tear=(k == torn_at))
        run.server.start()
        r = send(c, "GET", "/health")
        run.tally.add("restart after kill -9", r, answer(r) and r.status_code == 200)
        state = run.status().get("state")
        run.tally.add("restart after kill -9", None, state == "interrupted", what=f"job {state} after kill")
        resume(run, expected, torn, reached)
    send(c, "POST", "/stop_training")
    check_rows_once(run, "t")


def resume(run, expected, torn, reached):
    seq = run.status().get("seq", 0)
    r = send(run.client, "POST", "/resume_training")
    run.tally.add("resume after kill -9", r, answer(r) and r.status_code == 200)
    start = {}
    def started():
        nonlocal start
        events = run.client.get("/training_status", params={"since": seq}).json().get("events", [])
        start = next((e for e in events if e["type"] == "start"), {})
        return bool(start) or run.status().get("state") in ("failed", "done")
    run.wait_until(started, 60)
    warned = any("damaged" in str(e.get("message", "")) for e in
                 run.client.get("/training_status", params={"since": seq}).json().get("events", []))
    run.resumes.append((expected, start.get("step"), warned if torn else None, reached))
    ok = start.get("step") == expected and (warned or not torn)
    run.tally.add("resume after kill -9", None, ok,
                  what=f"resume at step {start.get('step')}, newest intact checkpoint {expected}, torn: {torn}")


def newest_checkpoint(run, tear):
    """The step of the newest checkpoint (with the server down); with `tear`, cut that file in
    half first, which leaves the one before it as the newest intact."""
    steps = sorted(int(p.stem.split("_")[1]) for p in (run.server.home / "checkpoints" / "t").glob("step_*.safetensors"))
    if tear and len(steps) >= 2:
        path = run.server.home / "checkpoints" / "t" / f"step_{steps[-1]:08d}.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        run.torn.add(path)
        return steps[-2], True
    return (steps[-1] if steps else 0), False


def check_rows_once(run, name):
    """Exact resume leaves one metrics row per step of each run: the rows a killed run wrote
    past its checkpoint are dropped when it resumes."""
    run.wait_idle()
    rows = run.client.get(f"/models/{name}/metrics").json().get("rows", [])
    per_run = Counter((r.get("run"), r.get("step")) for r in rows if "step" in r)
    twice = sum(1 for n in per_run.values() if n > 1)
    run.tally.add("resume after kill -9", None, twice == 0, what=f"{twice} steps with more than one row")


def make_book(rng, lines=800):
    words = ("the cat sat on a mat while an old river ran past green hills and quiet towns under a grey sky "
             "before the long winter came down from the north").split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))

