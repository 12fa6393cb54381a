"""Concurrent use: many writers at once on one data folder — threads of one server, and separate
processes (a CLI beside a server). Every change to a model or a book holds that object's lock
(files.held), so N writers racing for one name give one winner and N-1 clear refusals, and no
object is ever left half of one writer's and half of another's. RELIABILITY.md quotes the
FIGURES lines these tests print (-s)."""

import hashlib
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app import runs
from conftest import LOCAL_URL, ROOT, quick_train_config, tiny_config
from files import Exists, InUse, held
from model import GPT
from server import create_app
from app.store import Store
from test_server import free_port, start_server

WRITERS, ROUNDS = 10, 3  # parallel writers per round, rounds per test


def race(fn, n=WRITERS):
    """Run fn(i) in n threads released at the same instant; -> [result or exception] by i."""
    start, out = threading.Barrier(n), [None] * n

    def one(i):
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # the refusals are the point: collect them
            out[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def is_whole(store, name):
    """A model is whole when its weights load into the config beside them: a config of one writer
    and the weights of another fail with "size mismatch"."""
    return store.load_model(name).config == store.config(name)


# ----------------------------------------------------------------------------- the lock itself


def test_the_lock_excludes_other_threads_and_processes_and_lets_its_holder_reenter(tmp_path):
    path, inside, most = tmp_path / "x.lock", [0], [0]

    def hold(i):
        with held(path, "busy"):
            with held(path, "busy"):  # the holder takes it again (a store method calling another)
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.02)
                inside[0] -= 1
    race(hold, 6)
    assert most[0] == 1  # never two threads inside

    with held(path, "busy"):
        other = race(lambda i: held(path, "taken", wait_s=0).__enter__(), 1)[0]
    assert isinstance(other, InUse) and str(other) == "taken"

    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from files import held\n"
                              f"with held({str(path)!r}, 'busy'):\n print('in', flush=True); time.sleep(2)"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "in"
    with pytest.raises(InUse):  # another process holds it
        with held(path, "taken", wait_s=0):
            pass
    t0 = time.time()
    with held(path, "busy", wait_s=30):  # and it is ours once that process lets go
        assert child.poll() is not None or time.time() - t0 < 30
    assert child.wait(10) == 0


# ----------------------------------------------------------------------------- the store, from threads


def test_parallel_creates_of_one_name_make_one_whole_model(store):
    winners = []
    for _ in range(ROUNDS):
        out = race(lambda i: store.create_model("dup", tiny_config(d_model=8 * (i % 4 + 1), num_heads=1), seed=i))
        assert sum(not isinstance(r, Exception) for r in out) == 1, out
        assert all(isinstance(r, Exists) for r in out if isinstance(r, Exception)), out
        assert is_whole(store, "dup")
        winners.append(store.config("dup").d_model)
        store.delete_model("dup")
    print(f"\nFIGURES concurrent store create: {WRITERS} threads x {ROUNDS} rounds, 1 created + "
          f"{WRITERS - 1} Exists each round, 0 corrupt (winning d_model {winners})")


def test_parallel_versions_and_rollbacks_lose_no_update(store):
    store.create_model("m", tiny_config())
    store.save_version("m")
    store.save_weights("m", GPT(tiny_config()))  # other weights for v002
    store.update_lineage("m", steps=7)
    store.save_version("m")
    files = {v: (store.model_dir("m") / "versions" / v / "model.safetensors").read_bytes() for v in ("v001", "v002")}
    for _ in range(ROUNDS):
        out = race(lambda i: store.save_version("m") if i % 2 else store.rollback("m", ("v001", "v002")[i % 4 // 2]))
        assert [r for r in out if isinstance(r, Exception)] == []
    lin = store.lineage("m")
    names = [v["version"] for v in lin["versions"]]
    assert names == [f"v{i:03d}" for i in range(1, 3 + ROUNDS * WRITERS // 2)]  # every snapshot kept, none twice
    current = (store.model_dir("m") / "model.safetensors").read_bytes()
    assert current == files[lin["rolled_back_to"]] and lin["steps"] == {"v001": 0, "v002": 7}[lin["rolled_back_to"]]
    assert [m["name"] for m in store.list_models() if "damaged" not in m] == ["m"]


def test_parallel_uploads_of_one_name_store_one_book(store, book_text):
    for r in range(ROUNDS):
        texts = [f"Upload {i} of round {r}. ".encode() + book_text[:5000].encode() for i in range(WRITERS)]
        out = race(lambda i: store.books.add("same", texts[i], "same.txt"))
        assert sum(not isinstance(x, Exception) for x in out) == 1
        assert all(isinstance(x, Exists) for x in out if isinstance(x, Exception))
        info, text = store.books.read("same")
        assert hashlib.sha256(text.encode()).hexdigest() == info["sha256"] and text.encode() in texts
        store.books.delete("same")


def test_a_training_run_holds_its_model_against_a_second_run_rollback_and_delete(store, book):
    """The lease: in this process (another thread) and from another process (the CLI)."""
    store.create_model("t", tiny_config())
    started, stop = threading.Event(), threading.Event()
    job = threading.Thread(target=runs.train, args=(store, "t", [book], quick_train_config(steps=10_000)),
                           kwargs={"on_event": lambda e: started.set(), "should_stop": stop.is_set})
    job.start()
    try:
        assert started.wait(60)
        with pytest.raises(InUse, match="is being trained"):
            runs.train(store, "t", [book], quick_train_config())
        for change in (lambda: store.rollback("t", "v001"), lambda: store.delete_model("t")):
            with pytest.raises(InUse, match="is being trained"):
                change()
        cli = subprocess.run([sys.executable, "cli.py", "--home", str(store.home), "train", "t", "--book", book,
                              "--steps", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and "is being trained" in cli.stderr
    finally:
        stop.set()
        job.join(60)
    assert store.info("t")["steps"] > 0
    store.delete_model("t")  # free again once the run is over


def test_create_after_a_half_finished_delete_starts_clean(store):
    """A delete cut off by a crash leaves files but no config.json: a new model of that name must
    not inherit the old one's adapters, versions or metrics."""
    store.create_model("m", tiny_config())
    d = store.model_dir("m")
    (d / "adapters" / "old").mkdir(parents=True)
    (d / "adapters" / "old" / "adapter_config.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (d / "config.json").unlink()  # where delete_model was cut off
    store.create_model("m", tiny_config())
    assert store.adapters.list("m") == [] and store.metrics("m") == []


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("file, damage", [("lineage.json", '{"name": "bad", "runs": [\n'),
                                          ("config.json", '{"vocab_size": 512}{"extra": 1}')])
def test_one_damaged_file_lists_that_model_as_damaged_and_the_others_as_usual(store, file, damage):
    for name in ("a", "bad", "c"):
        store.create_model(name, tiny_config())
    (store.model_dir("bad") / file).write_text(damage)
    listed = {m["name"]: m for m in store.list_models()}
    assert set(listed) == {"a", "bad", "c"} and listed["a"]["params"] == listed["c"]["params"]
    assert f"bad/{file} is damaged" in listed["bad"]["damaged"] and "delete" in listed["bad"]["damaged"]
    with TestClient(create_app(store.home), base_url=LOCAL_URL) as client:
        health = client.get("/health").json()
        assert health["models"] == 3 and health["damaged"] == ["bad"]
        assert [m.get("damaged") is None for m in client.get("/models").json()] == [True, False, True]
        r = client.get("/models/bad")
        assert r.status_code == 500 and "is damaged" in r.json()["error"] and str(store.home) not in r.text
        assert client.delete("/models/bad").status_code == 200  # what the message says to do works
        assert client.get("/health").json()["damaged"] == []


# ----------------------------------------------------------------------------- a live server, and a CLI beside it


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    home, port = tmp_path_factory.mktemp("live") / "home", free_port()
    proc = start_server(home, port)
    yield f"http://127.0.0.1:{port}", Store(home)
    proc.terminate()
    proc.wait(10)


def post_all(url, path, bodies):
    """The bodies POSTed at once, one thread each; -> status codes."""
    with httpx.Client(base_url=url, timeout=60) as http:
        return [r.status_code if isinstance(r, httpx.Response) else r
                for r in race(lambda i: http.post(path, **bodies[i]), len(bodies))]


@pytest.mark.slow
def test_parallel_creates_over_http_give_one_201_and_the_rest_409(live):
    url, store = live
    statuses = []
    for _ in range(ROUNDS):
        bodies = [{"json": {"name": "dup", "vocab_size": 300, "d_model": 8 * (i % 4 + 1), "num_layers": 1,
                            "num_heads": 1, "d_ff": 16, "max_seq_len": 16, "seed": i}} for i in range(WRITERS)]
        got = post_all(url, "/create_model", bodies)
        assert sorted(got) == [201] + [409] * (WRITERS - 1), got
        assert is_whole(store, "dup")
        statuses += got
        assert httpx.delete(f"{url}/models/dup").status_code == 200
    print(f"\nFIGURES concurrent http create: {WRITERS} requests x {ROUNDS} rounds, "
          f"{statuses.count(201)} x 201, {statuses.count(409)} x 409, other {len(statuses) - statuses.count(201) - statuses.count(409)}, "
          f"0 corrupt")


@pytest.mark.slow
def test_parallel_rollbacks_over_http_and_from_the_cli_leave_every_model_readable(live):
    url, store = live
    store.create_model("rb", tiny_config())  # this process and the server share the locks
    store.save_version("rb")
    store.save_weights("rb", GPT(tiny_config()))
    store.update_lineage("rb", steps=5)
    store.save_version("rb")
    versions = {v: (store.model_dir("rb") / "versions" / v / "model.safetensors").read_bytes() for v in ("v001", "v002")}
    cli_runs = 0
    for r in range(ROUNDS):
        clis = [subprocess.Popen([sys.executable, "cli.py", "--home", str(store.home), "rollback", "rb", v],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for v in ("v001", "v002")] if r == 0 else []
        got = post_all(url, "/models/rb/rollback", [{"json": {"version": ("v001", "v002")[i % 2]}} for i in range(WRITERS)])
        assert got == [200] * WRITERS
        for c in clis:
            assert c.wait(120) == 0, c.stderr.read().decode()[-500:]
            cli_runs += 1
        lin = store.lineage("rb")  # whole JSON, and the weights are the version it names
        assert (store.model_dir("rb") / "model.safetensors").read_bytes() == versions[lin["rolled_back_to"]]
        health = httpx.get(f"{url}/health").json()
        assert health["damaged"] == [] and httpx.get(f"{url}/models").status_code == 200
    print(f"\nFIGURES concurrent rollback: {WRITERS} http requests x {ROUNDS} rounds + {cli_runs} CLI processes "
          f"at once, all answered 200/exit 0, lineage.json whole every round, 0 damaged models")


@pytest.mark.slow
def test_parallel_uploads_over_http_store_one_book_whose_sha256_matches(live, book_text):
    url, store = live
    for r in range(ROUNDS):
        texts = [f"Upload {i} of round {r}. {book_text[:4000]}".encode() for i in range(WRITERS)]
        got = post_all(url, "/upload_book", [{"files": {"file": ("t.txt", texts[i])}, "data": {"name": "same"}}
                                             for i in range(WRITERS)])
        assert sorted(got) == [201] + [409] * (WRITERS - 1), got
        info, text = store.books.read("same")
        assert hashlib.sha256(text.encode()).hexdigest() == info["sha256"] and info["text_bytes"] == len(text.encode())
        assert httpx.delete(f"{url}/books/same").status_code == 200
    print(f"\nFIGURES concurrent upload: {WRITERS} uploads of different texts under one name x {ROUNDS} rounds: "
          f"1 x 201 + {WRITERS - 1} x 409 each round, stored text = recorded sha256 every round")


@pytest.mark.slow
def test_processes_updating_one_model_lose_no_update(tmp_path):
    """Three processes take versions of one model at once (read the lineage, add one, write it
    back): every snapshot is kept, because the lock is a file lock, not a thread lock."""
    store = Store(tmp_path / "home")
    store.create_model("m", tiny_config())
    n_procs, per_proc = 3, 5
    script = ("import sys; from app.store import Store\ns = Store(sys.argv[1])\n"
              f"for _ in range({per_proc}): s.save_version('m')")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.home)], cwd=ROOT, stderr=subprocess.PIPE)
             for _ in range(n_procs)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read().decode()[-1000:]
    names = [v["version"] for v in store.lineage("m")["versions"]]
    assert names == [f"v{i:03d}" for i in range(1, n_procs * per_proc + 1)]
    assert all(torch.equal(store.load_model("m", version=v).transformer.wte.weight,
                           store.load_model("m").transformer.wte.weight) for v in names)
    print(f"\nFIGURES concurrent processes: {n_procs} processes x {per_proc} save_version on one model: "
          f"{len(names)}/{n_procs * per_proc} versions kept, lineage.json whole")
