"""What a hostile web page or a careless user can send: requests from another site through the
user's own browser (DNS rebinding, cross-site forms), books that inflate past the upload limit,
training steps that cannot fit in memory, and a resume on data that changed underneath the run.
The site guard is tested against a live `python server.py`; RELIABILITY.md ("hostile page")
quotes the FIGURES line (-s)."""

import io
import os
import re
import struct
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import cli
from app import runs
from app.records import new_run
import sizing
from conftest import LOCAL_URL, TINY, quick_train_config, tiny_config
from files import NotFound, StoreError
from app.web.guard import allowed_hosts
from server import create_app
from test_server import free_port, start_server

EVIL = "http://evil.example"


# ----------------------------------------------------------------------------- another site's page


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A live server that may also be reached as mybox.lan (--allowed-host)."""
    home, port = tmp_path_factory.mktemp("hostile") / "home", free_port()
    proc = start_server(home, port, "--allowed-host", "mybox.lan")
    yield f"http://127.0.0.1:{port}", port
    proc.terminate()
    proc.wait(10)


REFUSED = []  # (what was sent, status) for the FIGURES line


def sent(what, r):
    REFUSED.append((what, r.status_code))
    return r


def test_a_dns_rebinding_host_is_refused(live):
    """A page at attacker.example, whose name the attacker re-points to 127.0.0.1, reaches the
    server with `Host: attacker.example`: it gets no answer to read."""
    url, port = live
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.evil.example:{port}", "127.0.0.1:1", ""):
        r = sent(f"Host {host!r}", httpx.get(f"{url}/models", headers={"Host": host}))
        assert r.status_code == 403 and "--allowed-host" in r.json()["error"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"mybox.lan:{port}", f"MyBox.LAN:{port}"):
        assert httpx.get(f"{url}/models", headers={"Host": host}).status_code == 200, host


def test_another_sites_page_cannot_stop_a_training_job(live, book_text):
    url, port = live
    httpx.post(f"{url}/create_model", json={"name": "t", **TINY}).raise_for_status()
    httpx.post(f"{url}/upload_book", files={"file": ("b.txt", book_text.encode())}).raise_for_status()
    httpx.post(f"{url}/train", json={"model": "t", "book": "b", "steps": 100_000, "compile": "off"}).raise_for_status()
    deadline = time.time() + 60
    while httpx.get(f"{url}/training_status").json()["state"] != "running":
        assert time.time() < deadline
        time.sleep(0.1)
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Referer": f"{EVIL}/page.html"},
                    {"Origin": f"http://127.0.0.1:{port}.evil.example"}):
        r = sent(f"POST /stop_training {headers}", httpx.post(f"{url}/stop_training", headers=headers))
        assert r.status_code == 403 and "cross-site" in r.json()["error"], headers
    assert httpx.get(f"{url}/training_status").json()["state"] == "running"
    assert httpx.post(f"{url}/stop_training", headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200


def test_another_sites_page_cannot_run_a_heavy_read(live):
    """A GET of step_time runs a training probe: reads are guarded too; a link to the page is not."""
    url, port = live
    httpx.post(f"{url}/create_model", json={"name": "probe", **TINY}).raise_for_status()
    for headers in ({"Origin": EVIL}, {"Referer": f"{EVIL}/page.html"}, {"Sec-Fetch-Site": "cross-site"}):
        r = sent(f"GET /models/probe/step_time {headers}",
                 httpx.get(f"{url}/models/probe/step_time", params={"batch_size": 256}, headers=headers))
        assert r.status_code == 403 and "cross-site" in r.json()["error"], headers
    assert httpx.get(f"{url}/", headers={"Referer": f"{EVIL}/link.html", "Sec-Fetch-Site": "cross-site"}).status_code == 200
    own_page = {"Referer": f"http://127.0.0.1:{port}/", "Sec-Fetch-Site": "same-origin"}
    assert httpx.get(f"{url}/models/probe/step_time", params={"batch_size": 2}, headers=own_page).status_code == 200


def test_a_cross_site_form_upload_or_delete_is_refused(live, book_text):
    url, _ = live
    form = {"files": {"file": ("evil.txt", book_text[:3000].encode())}, "data": {"name": "evil"}}
    r = sent("cross-site form POST /upload_book", httpx.post(f"{url}/upload_book", headers={"Origin": EVIL}, **form))
    assert r.status_code == 403 and "evil" not in [b["name"] for b in httpx.get(f"{url}/books").json()]
    httpx.post(f"{url}/upload_book", **form).raise_for_status()
    r = sent("cross-site DELETE /books/evil", httpx.delete(f"{url}/books/evil", headers={"Origin": EVIL}))
    assert r.status_code == 403 and "evil" in [b["name"] for b in httpx.get(f"{url}/books").json()]
    print(f"\nFIGURES hostile page: {len(REFUSED)} hostile requests, {sum(s == 403 for _, s in REFUSED)} refused "
          f"with 403: {REFUSED}")


def test_curl_without_an_origin_and_the_servers_own_page_are_served(live, book_text):
    url, port = live
    form = {"files": {"file": ("own.txt", book_text[:3000].encode())}, "data": {"name": "own"}}
    assert httpx.post(f"{url}/upload_book", **form).status_code == 201  # curl, a script: no Origin at all
    assert httpx.delete(f"{url}/books/own", headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    assert httpx.post(f"{url}/upload_book", headers={"Origin": f"http://localhost:{port}"}, **form).status_code == 201
    assert httpx.delete(f"{url}/books/own", headers={"Host": f"mybox.lan:{port}", "Origin": f"http://mybox.lan:{port}",
                                                     "Referer": f"http://mybox.lan:{port}/"}).status_code == 200


def test_allowed_hosts_are_the_bound_address_its_loopback_names_and_the_extra_ones():
    assert allowed_hosts("127.0.0.1", 8000) == {("127.0.0.1", 8000), ("localhost", 8000), ("::1", 8000)}
    assert allowed_hosts("192.168.1.5", 80, ["mybox.lan", "nas:8080"]) == {
        ("192.168.1.5", 80), ("mybox.lan", None), ("nas", 8080)}
    app = create_app(None, hosts=allowed_hosts("0.0.0.0", 8000, ["mybox.lan"]))  # --host 0.0.0.0: name it
    with TestClient(app, base_url="http://mybox.lan:8000") as c:
        assert c.get("/health").status_code == 200
    with TestClient(app, base_url="http://192.168.1.5:8000") as c:
        assert c.get("/health").status_code == 403


# ----------------------------------------------------------------------------- limits a request could bypass


def epub(n_members, member_bytes):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n_members):
            z.writestr(f"c{i:05d}.xhtml", "<p>" + "The keeper lit the lamp. " * (member_bytes // 25) + "</p>")
    return buf.getvalue()


def test_an_epub_is_capped_in_total_not_only_per_member(tmp_path):
    """Eight 1 MiB chapters each pass the per-member ratio check; together they are 8 MiB of text
    from a ~30 KB upload, past a 1 MB upload limit."""
    small_bomb, many_files = epub(8, 2**20), epub(5001, 30)
    assert len(small_bomb) < 100_000
    with TestClient(create_app(tmp_path / "home", max_upload_mb=1), base_url=LOCAL_URL) as c:
        r = c.post("/upload_book", files={"file": ("b.epub", small_bomb)})
        assert r.status_code == 400 and "inflate to 8.0 MB, more than the 1 MB" in r.json()["error"]
        r = c.post("/upload_book", files={"file": ("m.epub", many_files)})
        assert r.status_code == 400 and "5,001 files" in r.json()["error"]
        assert c.get("/books").json() == [] and c.post("/upload_book", files={"file": ("ok.epub", epub(2, 2**18))}).status_code == 201


def lying_epub(real_mib, claimed_bytes):
    """An .epub whose one chapter inflates to `real_mib` MiB while its zip headers (local and
    central) say it holds `claimed_bytes`: the file_size fields are patched after writing."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("c.xhtml", "w") as f:
        for _ in range(real_mib):
            f.write(b"<p>" + b"a" * (2**20 - 3))
    data = bytearray(buf.getvalue())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # where each header keeps file_size
        at = data.index(signature)
        data[at + offset:at + offset + 4] = struct.pack("<I", claimed_bytes)
    return bytes(data)


def peak_rss_mib():
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_an_epub_whose_headers_lie_about_its_size_is_refused_without_inflating_it(tmp_path):
    """A chapter that says 2,000 bytes but inflates to 256 MiB: refused, and the server's peak
    memory grows by far less than what the chapter would inflate to."""
    bomb = lying_epub(256, 2000)
    assert len(bomb) < 2**20 and zipfile.ZipFile(io.BytesIO(bomb)).getinfo("c.xhtml").file_size == 2000
    with TestClient(create_app(tmp_path / "home"), base_url=LOCAL_URL) as c:
        c.get("/health")
        Path("/proc/self/clear_refs").write_text("5")  # start the peak (VmHWM) over from the memory in use now
        before = peak_rss_mib()
        r = c.post("/upload_book", files={"file": ("bomb.epub", bomb)})
        grew = peak_rss_mib() - before
        assert r.status_code == 400 and "cannot be read" in r.json()["error"], r.text
        assert grew < 100, f"peak memory grew by {grew:.0f} MiB"
        assert c.get("/books").json() == []


def test_a_huge_json_body_is_refused_before_it_is_parsed(tmp_path):
    body = b'{"model": "m", "prompt": "' + b"a" * 100 * 2**20 + b'"}'
    with TestClient(create_app(tmp_path / "home"), base_url=LOCAL_URL) as c:
        for sent_as in (body, (body[i:i + 2**20] for i in range(0, len(body), 2**20))):  # with and without Content-Length
            r = c.post("/generate", content=sent_as, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "a request may send" in r.json()["error"], r.text
        assert c.post("/generate", json={"model": "m", "prompt": "é" * 100_000}).status_code == 404  # the longest prompt fits


def test_train_refuses_a_step_too_big_for_this_machines_memory(tmp_path, book_text, capsys):
    home = tmp_path / "home"
    with TestClient(create_app(home), base_url=LOCAL_URL) as c:
        c.post("/create_model", json={"name": "long", **TINY, "max_seq_len": 8192}).raise_for_status()
        c.post("/upload_book", files={"file": ("b.txt", book_text.encode())}).raise_for_status()
        r = c.post("/train", json={"model": "long", "book": "b", "batch_size": 4096})
        error = r.json()["error"]
        assert r.status_code == 400 and "batch_size 4096 x seq_len 8192" in error and "GiB available" in error
        assert c.get("/training_status").json()["state"] == "idle"
    code = cli.main(["--home", str(home), "train", "long", "--book", "b", "--batch-size", "4096"])
    assert code == 2 and "GiB available" in capsys.readouterr().err


def test_create_model_refuses_a_model_this_machine_could_not_train(store, monkeypatch):
    monkeypatch.setattr(sizing, "available_memory", lambda device=None: 2**30)  # a machine with 1 GiB free
    with pytest.raises(StoreError, match="only creates models this machine can train"):
        store.create_model("big", tiny_config(vocab_size=32_000, d_model=1024, num_layers=8, num_heads=8, d_ff=4096))
    assert store.list_models() == []
    store.create_model("tiny", tiny_config())  # a small one fits


# ----------------------------------------------------------------------------- resume on the same data


def stopped_run(store, book, steps=3):
    """A run of model "t" on `book`, stopped after `steps` steps (it keeps a checkpoint)."""
    store.create_model("t", tiny_config())
    done = []
    runs.train(store, "t", [book], quick_train_config(steps=8), on_event=lambda e: done.append(e),
               should_stop=lambda: sum(e["type"] == "step" for e in done) >= steps)


def test_resume_refuses_a_book_whose_text_changed_unless_told_and_then_the_lineage_says_so(store, book, book_text, capsys):
    stopped_run(store, book)
    old_sha = store.books.info(book)["sha256"]
    store.books.delete(book)
    store.books.add(book, (book_text[20_000:] + book_text[:20_000]).encode(), "other.txt")  # same name, other text
    code = cli.main(["--home", str(store.home), "resume", "t"])
    err = capsys.readouterr().err
    assert code == 2 and "changed since this run started" in err and "--changed-data" in err
    assert cli.main(["--home", str(store.home), "resume", "t", "--changed-data"]) == 0
    run = store.lineage("t")["runs"][-1]
    new_sha = store.books.info(book)["sha256"]
    assert run["status"] == "done" and run["books"] == [{"name": book, "sha256": new_sha}]
    assert run["data_changed"] == [{"step": 3, "books": [{"book": book, "sha256_then": old_sha, "sha256_now": new_sha}]}]


def test_resume_of_a_deleted_book_is_refused(store, book):
    stopped_run(store, book)
    store.books.delete(book)
    with pytest.raises(StoreError, match="a book of this run is gone"):
        runs.resume(store, "t", changed_data=True)


def test_a_book_name_never_becomes_a_path(store, tmp_path, monkeypatch):
    """Only the CLI may name a book by its path; a name from the web API is a name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret").write_text("The server's own file, which no web request may read. " * 20)
    with pytest.raises(NotFound, match="no book named 'secret'"):
        store.books.resolve("secret")
    assert store.books.resolve("secret", allow_path=True)[1].startswith("The server's own file")


# ----------------------------------------------------------------------------- caches


def test_compiled_kernels_are_cached_in_the_data_folder(trained, monkeypatch):
    """compile=auto: inductor's cache goes under the data folder, not /tmp/torchinductor_<user>."""
    import speed
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    store, name = trained
    monkeypatch.setattr(speed, "USER_COMPILE_CACHE", None)  # the user chose no place of their own
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    runs.make_trainer(store, name, new_run(["book"], quick_train_config()))
    assert cache_dir() == os.fspath(store.home / "cache" / "inductor")
