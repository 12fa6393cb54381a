"""Bad input through every door: the command line and every endpoint of the web API.

Hypothesis (property-based testing) generates the inputs: hostile names, absurd model configs,
out-of-range sampling values, arbitrary bytes as books; a fixed list adds the files that need
crafting (zip bombs, encrypted or lying .epub archives, odd encodings). The property is always
the same: a clear error (exit code 2 with one `error:` line, or a 4xx JSON {"error": ...}), never
a traceback or a 500, nothing written outside the data folder, and the server keeps serving.
Every case is counted; RELIABILITY.md reports the counts.
"""

import io
import json
import math
import random
import struct
import tempfile
import zipfile
from collections import Counter
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from app.runs import train
from conftest import LOCAL_URL, ROOT, quick_train_config, tiny_config
from app.names import NAME_RE
from app.store import Store

CASES = Counter()  # cases tried per group, printed for RELIABILITY.md
FUZZ = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nFIGURES fuzz: {dict(CASES)}, total {sum(CASES.values())}")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A data folder with one book and one tiny trained model ("m"), shared by the cases."""
    home = tmp_path_factory.mktemp("fuzz") / "home"
    store = Store(home)
    store.books.add("book", (ROOT / "books" / "example_book.txt").read_bytes()[:30_000], "book.txt")
    store.create_model("m", tiny_config(vocab_size=400))
    train(store, "m", ["book"], quick_train_config(steps=4, eval_every=4, checkpoint_every=4))
    return home


def tree(folder):
    """Every file under folder with its size and mtime: what a case may not change."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- hostile inputs

NASTY_NAMES = ["", ".", "..", "../evil", "../../etc/passwd", "a/b", "/abs", "a\\b", "a\x00b", "\x00", "x" * 65,
               "dot.name", "ünïcode", "ａｂｃ", "a\u202eb", "a\u200bb", "tab\tname", "new\nline", " lead", "trail ",
               "%2e%2e", "..%2f", "a:b", "*", "?", "CON.txt"]
bad_names = st.one_of(st.sampled_from(NASTY_NAMES), st.text(max_size=80).filter(lambda s: not NAME_RE.fullmatch(s)))

CONFIG_FIELDS = ["vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"]
absurd_ints = st.one_of(st.integers(max_value=0), st.integers(min_value=10**6, max_value=10**30),
                        st.sampled_from([10**9, -1, -(2**63), 2**64]))
absurd_configs = st.one_of(
    st.tuples(st.sampled_from(CONFIG_FIELDS), absurd_ints),
    st.tuples(st.just("dropout"), st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0),
                                           st.sampled_from([math.nan, math.inf, -math.inf]))),
    st.tuples(st.integers(8, 1024), st.integers(1, 128)).filter(lambda dh: dh[0] % dh[1]).map(
        lambda dh: ("num_heads", dh)),  # heads that do not divide d_model
)

SAMPLING = {  # option -> values outside its range
    "max_new_tokens": absurd_ints | st.integers(10_001, 10**7),
    "temperature": st.floats(max_value=-1e-9) | st.floats(min_value=5.0001) | st.just(math.nan),
    "top_k": st.integers(max_value=-1) | st.integers(min_value=200_001),
    "top_p": st.floats(max_value=-1e-9) | st.floats(min_value=1.0001) | st.just(math.nan),
    "repetition_penalty": st.floats(max_value=0.4999) | st.floats(min_value=5.0001) | st.just(math.nan),
}
bad_sampling = st.sampled_from(sorted(SAMPLING)).flatmap(lambda k: st.tuples(st.just(k), SAMPLING[k]))


def zip_of(members, method=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def patched_zip(data, local_offset, central_offset, fmt, value):
    """Overwrite one field in the first local header and the first central directory entry."""
    d = bytearray(data)
    struct.pack_into(fmt, d, d.find(b"PK\x03\x04") + local_offset, value)
    struct.pack_into(fmt, d, d.find(b"PK\x01\x02") + central_offset, value)
    return bytes(d)


CHAPTER = b"<html><body><p>" + b"The keeper lit the lamp at dusk, as every night. " * 40 + b"</p></body></html>"
GOOD_EPUB = zip_of([("c1.xhtml", CHAPTER)])
_rng = random.Random(7)
BAD_BOOKS = {  # file name -> bytes: each must be refused with a clear message
    "empty.txt": b"",
    "nul.txt": b"\x00" * 5000,
    "random.bin": bytes(_rng.randrange(256) for _ in range(20_000)),
    "image.png": b"\x89PNG\r\n\x1a\n" + bytes(_rng.randrange(256) for _ in range(5000)),
    "spaces.txt": b" \n\t\r\n " * 100,
    "zip_bomb.epub": zip_of([("c1.xhtml", CHAPTER), ("bomb.xhtml", b"\x00" * 30_000_000)]),
    "nested_bomb.epub": zip_of([("inner.epub", zip_of([("b.xhtml", b"a" * 20_000_000)]))]),
    "lying_size.epub": patched_zip(GOOD_EPUB, 22, 24, "<I", 100),  # says 100 bytes, inflates to 2 KB
    "encrypted.epub": patched_zip(GOOD_EPUB, 6, 8, "<H", 1),  # the "encrypted" flag
    "unknown_method.epub": patched_zip(GOOD_EPUB, 8, 10, "<H", 99),  # AES, which zipfile cannot read
    "garbled.epub": GOOD_EPUB[:40] + bytes(b ^ 0x5A for b in GOOD_EPUB[40:80]) + GOOD_EPUB[80:],
    "truncated.epub": GOOD_EPUB[: len(GOOD_EPUB) // 2],
    "no_chapters.epub": zip_of([("mimetype", b"application/epub+zip"), ("x.css", b"p{}")]),
    "not_a_zip.epub": b"PK\x03\x04" + b"\x00" * 100,
}
RU = "Смотритель маяка поднялся по лестнице в сумерках и зажёг лампу, как делал это одиннадцать зим. "
ODD_BOOKS = {  # odd but honest text -> a piece of what must come out (None: refusing clearly is fine)
    "utf16_odd_length.txt": (b"\xff\xfe" + "A book in UTF-16 with an odd byte.".encode("utf-16-le") + b"A",
                             "A book in UTF-16 with an odd byte."),
    "utf32.txt": (("Старый маяк стоял на скале. " * 20).encode("utf-32"), "Старый маяк стоял на скале."),
    "utf16_bom.txt": (("Der Leuchtturm stand auf dem Felsen. " * 20).encode("utf-16"), "Der Leuchtturm stand"),
    "shift_jis.txt": (("灯台守は夕暮れに階段を上り、ランプに火をともした。" * 20).encode("shift_jis"), "灯台守は夕暮れに"),
    "gb18030.txt": (("灯塔看守人在黄昏时登上楼梯，点亮了灯。" * 20).encode("gb18030"), "灯塔看守人在黄昏时"),
    "koi8r.txt": ((RU * 10).encode("koi8-r"), RU.strip()),
    "cp1251.txt": ((RU * 10).encode("cp1251"), RU.strip()),
    "mixed_invalid_utf8.txt": (("The keeper climbed. " * 30).encode() + b"\xff\xfe\xc3\x28 broken " * 3,
                               "The keeper climbed."),
    "bom_only.txt": (b"\xef\xbb\xbf" + b"Just a few words of text, after a BOM." * 3, "Just a few words"),
    "fb2_entities.fb2": (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]>'
                         b"<FictionBook><body><p>&b;&b;&b; and some real words of the book here.</p></body>"
                         b"</FictionBook>",
                         "some real words of the book"),  # entities are not expanded: no "billion laughs"
    "rtl_and_zero_width.txt": ("Text with \u202e reversed \u200b zero-width marks, line after line.\n".encode() * 10,
                               "zero-width marks"),
}


# ----------------------------------------------------------------------------- the command line


def run_cli(capsys, home, *args):
    try:
        code = cli.main(["--home", str(home), *args])
    except SystemExit as e:  # argparse refuses malformed flags itself, with usage and exit code 2
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_cli_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err and err.strip(), err
    last = err.strip().splitlines()[-1]
    assert "error:" in last, err
    for w in words:
        assert w in err, (w, err)


@FUZZ
@given(name=bad_names, command=st.sampled_from(["create", "generate", "delete", "versions", "resume", "add-book"]))
def test_cli_refuses_bad_names(home, tmp_path, capsys, name, command):
    CASES["cli names"] += 1
    before = tree(tmp_path.parent)
    args = {"create": ["create", "--preset", "small", "--", name],  # "--": a name may start with "-"
            "add-book": ["add-book", "--", name, str(ROOT / "books" / "example_book.txt")]}
    code, _, err = run_cli(capsys, home, *args.get(command, [command, "--", name]))
    assert_cli_error(code, err, "invalid")
    assert tree(tmp_path.parent) == before


@FUZZ
@given(change=absurd_configs)
def test_cli_refuses_absurd_model_configs(home, capsys, change):
    CASES["cli configs"] += 1
    key, value = change
    sizes = dict(vocab_size=400, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32)
    if key == "num_heads" and isinstance(value, tuple):
        sizes["d_model"], value = value
    args = ["create", "bad"] + [f"--{k.replace('_', '-')}={v}" for k, v in {**sizes, key: value}.items()]
    code, _, err = run_cli(capsys, home, *args)
    assert_cli_error(code, err)
    assert key in err or "divisible by num_heads" in err or "parameters" in err, err
    assert not (home / "models" / "bad").exists()


@FUZZ
@given(change=bad_sampling)
def test_cli_refuses_out_of_range_sampling(home, capsys, change):
    CASES["cli sampling"] += 1
    key, value = change
    code, out, err = run_cli(capsys, home, "generate", "m", "--prompt", "The", f"--{key.replace('_', '-')}={value}")
    assert_cli_error(code, err, key)


@pytest.mark.parametrize("filename", sorted(BAD_BOOKS))
def test_cli_refuses_bad_books(home, tmp_path, capsys, filename):
    CASES["cli bad books"] += 1
    path = tmp_path / filename
    path.write_bytes(BAD_BOOKS[filename])
    code, _, err = run_cli(capsys, home, "add-book", "bad", str(path))
    assert_cli_error(code, err)
    assert not (home / "books" / "bad.txt").exists()


@pytest.mark.parametrize("filename", sorted(ODD_BOOKS))
def test_cli_reads_odd_encodings(home, tmp_path, capsys, filename):
    CASES["cli odd books"] += 1
    path = tmp_path / filename
    data, expected = ODD_BOOKS[filename]
    path.write_bytes(data)
    name = "odd_" + path.stem
    code, out, err = run_cli(capsys, home, "add-book", name, str(path))
    assert code == 0, err
    text = (home / "books" / f"{name}.txt").read_text(encoding="utf-8")  # always valid UTF-8
    assert expected in text and "\x00" not in text and json.loads(out)["characters"] == len(text)


@FUZZ
@given(data=st.binary(max_size=3000), ext=st.sampled_from([".txt", ".epub", ".fb2", ""]))
def test_cli_add_book_never_crashes_on_any_bytes(home, tmp_path, capsys, data, ext):
    CASES["cli random bytes"] += 1
    path = tmp_path / f"f{ext}"
    path.write_bytes(data)
    code, out, err = run_cli(capsys, home, "add-book", "rnd", str(path))
    if code != 0:
        assert_cli_error(code, err)
        return
    (home / "books" / "rnd.txt").read_text(encoding="utf-8")  # whatever was read is stored as UTF-8
    assert cli.main(["--home", str(home), "add-book", "rnd", str(path)]) == 2  # the name is taken now
    (home / "books" / "rnd.txt").unlink()
    (home / "books" / "rnd.json").unlink()


@pytest.mark.parametrize("args, words", [
    (["generate", "ghost"], ["no model named 'ghost'"]),
    (["train", "ghost", "--book", "book"], ["ghost"]),
    (["train", "m", "--book", "no_such_book"], ["no book 'no_such_book'"]),
    (["train", "m", "--book", "../../no_such_dir/book.txt"], ["no book"]),
    (["eval", "m", "--book", "nothing"], ["no book"]),
    (["rollback", "m", "v999"], ["no version 'v999'"]),
    (["rollback", "m", "../../v001"], ["no version"]),
    (["resume", "ghost"], ["ghost"]),
    (["generate", "m", "--adapter", "nope"], ["no adapter 'nope'"]),
    (["generate", "m", "--adapter", "../x"], ["invalid adapter name"]),
    (["train", "m", "--book", "book", "--steps", "-5"], ["steps"]),
    (["train", "m", "--book", "book", "--learning-rate", "nan"], ["learning_rate"]),
    (["train", "m", "--book", "book", "--batch-size", "100000000"], ["batch_size"]),
    (["create", "x", "--d-model", "1e9"], ["invalid int value"]),
    (["create", "x", "--preset", "huge"], ["invalid choice"]),
])
def test_cli_unknown_things_and_malformed_flags(home, capsys, args, words):
    CASES["cli unknown/malformed"] += 1
    code, _, err = run_cli(capsys, home, *args)
    assert_cli_error(code, err, *words)


# ----------------------------------------------------------------------------- the web API

HTTP_ERROR = range(400, 500)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A TestClient over a fresh data folder (upload limit 1 MB) with a trained model "m" and a
    book "book"; temp files go to a private folder so that leftovers can be seen."""
    from fastapi.testclient import TestClient

    from server import create_app

    base = tmp_path_factory.mktemp("api")
    (base / "tmp").mkdir()
    old_tempdir, tempfile.tempdir = tempfile.tempdir, str(base / "tmp")
    store = Store(base / "home")
    store.books.add("book", (ROOT / "books" / "example_book.txt").read_bytes()[:30_000], "book.txt")
    store.create_model("m", tiny_config(vocab_size=400))
    train(store, "m", ["book"], quick_train_config(steps=4, eval_every=4, checkpoint_every=4))
    with TestClient(create_app(base / "home", max_upload_mb=1), base_url=LOCAL_URL, follow_redirects=False) as client:
        yield client
    tempfile.tempdir = old_tempdir


@pytest.fixture
def guarded(api):
    """Snapshot everything next to the data folder; after the test: the same files, no temp
    leftovers, and the server still answers /health."""
    home = api.app.state.azr.store.home
    outside = lambda: {k: v for k, v in tree(home.parent).items() if not k.startswith(str(home) + "/")}  # noqa: E731
    before = outside()
    yield api
    assert outside() == before, "a file was written outside the data folder"
    assert {p.parent.name for p in home.iterdir()} <= {home.name}
    assert sorted(p.name for p in home.iterdir()) <= ["books", "cache", "checkpoints", "jobs", "models"]
    r = api.get("/health")
    assert r.status_code == 200 and r.json()["ok"]


def assert_api_error(r, *words, statuses=HTTP_ERROR):
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = r.json()["error"]
    assert isinstance(message, str) and message.strip()
    for w in words:
        assert w in message, (w, message)
    return message


def post_json(client, path, body):
    """POST body as JSON, NaN and Infinity included (Python's json writes them; httpx refuses)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def encoded(name):
    """Percent-encode every byte, dots and slashes too, so the server sees exactly this name."""
    return "".join(f"%{b:02X}" for b in name.encode("utf-8"))


NAME_ROUTES = [("GET", "/models/{}"), ("DELETE", "/models/{}"), ("GET", "/models/{}/metrics"),
               ("POST", "/models/{}/rollback"), ("GET", "/books/{}"), ("DELETE", "/books/{}"),
               ("GET", "/download_model/{}"), ("GET", "/download_model/{}?format=gguf"),
               ("GET", "/download_adapter/m/{}?format=peft")]


@FUZZ
@given(name=bad_names.filter(lambda s: s.strip("/") != ""), route=st.sampled_from(NAME_ROUTES))
def test_api_refuses_bad_names_in_paths(guarded, name, route):
    CASES["api names in paths"] += 1
    method, path = route
    r = guarded.request(method, path.format(encoded(name)), json={"version": "v001"} if method == "POST" else None)
    if r.status_code == 307:  # "x/" is redirected to "x" like any trailing slash; not followed here
        assert unquote(name).endswith("/")  # (the test client decodes the path twice)
        return
    assert_api_error(r)


NAME_BODIES = [  # (path, body with NAME where the hostile name goes)
    ("/create_model", {"name": "NAME", **{k: v for k, v in tiny_config(vocab_size=400).to_dict().items()}}),
    ("/train", {"model": "NAME", "book": "book", "steps": 5}),
    ("/train", {"model": "m", "book": "NAME", "steps": 5}),
    ("/train", {"model": "m", "books": ["book", "NAME"], "steps": 5}),
    ("/train", {"model": "m", "book": "book", "steps": 5, "mode": "lora", "adapter": "NAME"}),
    ("/generate", {"model": "NAME", "prompt": "The"}),
    ("/generate", {"model": "m", "adapter": "NAME", "prompt": "The"}),  # optional: "" means none
    ("/generate_stream", {"model": "NAME", "prompt": "The"}),
    ("/attention", {"model": "NAME", "prompt": "The"}),
    ("/arena", {"model_a": "m", "model_b": "NAME", "prompt": "The"}),
    ("/arena", {"model_a": "m", "model_b": "m", "prompt": "The", "book": "NAME"}),
    ("/merge", {"model": "m", "adapter": "a", "out": "NAME"}),
    ("/models/m/rollback", {"version": "NAME"}),
]


@FUZZ
@given(name=bad_names, case=st.sampled_from(NAME_BODIES))
def test_api_refuses_bad_names_in_bodies(guarded, name, case):
    CASES["api names in bodies"] += 1
    path, body = case
    optional = path == "/generate" and body.get("adapter") == "NAME" or path == "/arena" and body.get("book") == "NAME"
    if name == "" and optional:
        return  # an optional name left empty means "none", which is fine
    body = {k: ([name if x == "NAME" else x for x in v] if isinstance(v, list) else name if v == "NAME" else v)
            for k, v in body.items()}
    assert_api_error(guarded.post(path, json=body))


@FUZZ
@given(name=bad_names, data=st.sampled_from([b"A plain small book, line after line of words.\n" * 5]))
def test_api_upload_refuses_bad_book_names(guarded, name, data):
    CASES["api upload names"] += 1
    r = guarded.post("/upload_book", files={"file": ("b.txt", data)}, data={"name": name})
    if name == "":  # an empty form field means "no name given": the file name is used
        assert r.status_code == 201 and guarded.delete("/books/b").status_code == 200
        return
    assert_api_error(r, "invalid book name")


@FUZZ
@given(change=absurd_configs, via=st.sampled_from(["create", "estimate"]))
def test_api_refuses_absurd_model_configs(guarded, change, via):
    CASES["api configs"] += 1
    key, value = change
    cfg = tiny_config(vocab_size=400).to_dict()
    if key == "num_heads" and isinstance(value, tuple):
        cfg["d_model"], value = value
    cfg[key] = value
    if via == "estimate" and key == "dropout":
        return  # /estimate takes no dropout
    if via == "create":
        r = post_json(guarded, "/create_model", {"name": "bad", **cfg})
    else:
        r = guarded.get("/estimate", params={k: v for k, v in cfg.items() if k != "dropout"})
    message = assert_api_error(r)
    assert key in message or "divisible by num_heads" in message or "parameters" in message, message
    assert guarded.get("/models/bad").status_code == 404


API_SAMPLING = SAMPLING


@FUZZ
@given(field=st.sampled_from(sorted(API_SAMPLING)).flatmap(lambda k: st.tuples(st.just(k), API_SAMPLING[k])),
       path=st.sampled_from(["/generate", "/generate_stream", "/arena"]))
def test_api_refuses_out_of_range_sampling(guarded, field, path):
    CASES["api sampling"] += 1
    key, value = field
    body = {"model_a": "m", "model_b": "m"} if path == "/arena" else {"model": "m"}
    r = post_json(guarded, path, {**body, "prompt": "The", key: value})
    message = assert_api_error(r)
    assert key.split("_")[0] in message, message


JSON_ENDPOINTS = ["/create_model", "/train", "/generate", "/generate_stream", "/attention", "/arena", "/merge",
                  "/models/m/rollback"]


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                     st.sampled_from([b"{", b"[]", b"null", b'{"name": }', b'{"model": "m"', b"\xff\xfe{}",
                                      b'{"model": "m", "prompt": "\xc3\x28"}', b"{}" * 1000, b"1e999999"])),
       path=st.sampled_from(JSON_ENDPOINTS))
def test_api_malformed_json(guarded, raw, path):
    CASES["api malformed json"] += 1
    r = guarded.post(path, content=raw, headers={"content-type": "application/json"})
    assert_api_error(r)


@FUZZ
@given(body=st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8), max_size=5), path=st.sampled_from(JSON_ENDPOINTS))
def test_api_random_json_bodies(guarded, body, path):
    CASES["api random json"] += 1
    assert_api_error(post_json(guarded, path, body))


@pytest.mark.parametrize("filename", sorted(BAD_BOOKS))
def test_api_refuses_bad_books(guarded, filename):
    CASES["api bad books"] += 1
    r = guarded.post("/upload_book", files={"file": (filename, BAD_BOOKS[filename])}, data={"name": "bad"})
    assert_api_error(r, statuses=[400])
    assert guarded.get("/books/bad").status_code == 404


def test_api_oversize_and_missing_uploads(guarded):
    CASES["api upload size/shape"] += 4
    assert_api_error(guarded.post("/upload_book", files={"file": ("big.txt", b"word " * 300_000)}), "upload limit",
                     statuses=[413])
    assert_api_error(guarded.post("/upload_book", files={"file": ("zero.txt", b"")}), "empty", statuses=[400])
    assert_api_error(guarded.post("/upload_book", data={"name": "x"}), "file", statuses=[422])
    assert_api_error(guarded.post("/upload_book", content=b"not multipart", headers={"content-type": "text/plain"}))


@FUZZ
@given(data=st.binary(max_size=2000), stem=st.one_of(st.sampled_from(NASTY_NAMES), st.text(max_size=40)),
       ext=st.sampled_from([".txt", ".epub", ".fb2", "", "/../../x.txt"]))
def test_api_upload_any_bytes_any_file_name(guarded, data, stem, ext):
    CASES["api random uploads"] += 1
    home = guarded.app.state.azr.store.home
    r = guarded.post("/upload_book", files={"file": (stem + ext, data)})
    if r.status_code != 201:
        assert_api_error(r)
        return
    name = r.json()["name"]
    assert NAME_RE.fullmatch(name) and (home / "books" / f"{name}.txt").is_file()
    assert guarded.delete(f"/books/{name}").status_code == 200


@pytest.mark.parametrize("query", ["format=native", "format=hf", "format=gguf&dtype=q8_0"])
def test_downloads_leave_no_temp_files(guarded, query):
    CASES["api downloads"] += 1
    assert guarded.get(f"/download_model/m?{query}").status_code == 200  # `guarded` checks the temp folder


@pytest.mark.parametrize("method, path, body, status, words", [
    ("GET", "/models/ghost", None, 404, ["ghost"]),
    ("DELETE", "/models/ghost", None, 404, ["ghost"]),
    ("GET", "/books/ghost", None, 404, ["ghost"]),
    ("DELETE", "/books/ghost", None, 404, ["ghost"]),
    ("GET", "/download_model/ghost", None, 404, ["ghost"]),
    ("GET", "/download_model/m?format=hf&dtype=q8_0", None, 400, ["GGUF type"]),
    ("GET", "/download_model/m?format=onnx", None, 422, ["format"]),
    ("GET", "/download_adapter/m/nope?format=peft", None, 404, ["nope"]),
    ("GET", "/models/m/metrics?adapter=..%2Fx", None, 400, ["invalid adapter name"]),
    ("GET", "/models/m/metrics?since=-1", None, 422, ["since"]),
    ("GET", "/training_status?since=-5", None, 422, ["since"]),
    ("POST", "/generate", {"model": "ghost"}, 404, ["ghost"]),
    ("POST", "/generate", {"model": "m", "adapter": "nope"}, 404, ["nope"]),
    ("POST", "/attention", {"model": "m", "prompt": "The", "layer": 99}, 400, ["layer"]),
    ("POST", "/attention", {"model": "m", "prompt": "The", "head": -1}, 400, ["head"]),
    ("POST", "/attention", {"model": "m", "prompt": ""}, 400, ["prompt"]),
    ("POST", "/arena", {"model_a": "m", "model_b": "ghost"}, 404, ["ghost"]),
    ("POST", "/arena", {"model_a": "m", "model_b": "m", "book": "ghost"}, 404, ["ghost"]),
    ("POST", "/arena", {"model_a": "m", "model_b": "m", "windows": 10**9}, 400, ["windows"]),
    ("POST", "/train", {"model": "m", "book": "ghost"}, 404, ["ghost"]),
    ("POST", "/train", {"model": "m", "books": []}, 400, ["book"]),
    ("POST", "/train", {"model": "m", "book": "/etc/passwd"}, 400, ["invalid book name"]),
    ("POST", "/train", {"model": "m", "book": "book", "steps": 0}, 400, ["steps"]),
    ("POST", "/train", {"model": "m", "book": "book", "steps": 10**12}, 400, ["steps"]),
    ("POST", "/train", {"model": "m", "book": "book", "learning_rate": -1}, 400, ["learning_rate"]),
    ("POST", "/train", {"model": "m", "book": "book", "batch_size": 10**9}, 400, ["batch_size"]),
    ("POST", "/train", {"model": "m", "book": "book", "mode": "lora", "adapter": "a", "lora_r": -3}, 400, ["lora_r"]),
    ("POST", "/train", {"model": "m", "book": "book", "secret_option": 1}, 422, ["secret_option"]),
    ("POST", "/merge", {"model": "m", "adapter": "nope", "out": "x"}, 404, ["nope"]),
    ("POST", "/models/m/rollback", {"version": "v999"}, 404, ["v999"]),
    ("POST", "/models/m/rollback", {"version": "../../../etc"}, 404, ["no version"]),
    ("POST", "/stop_training", None, 409, ["no training job"]),
    ("GET", "/no/such/route", None, 404, []),
    ("PUT", "/models/m", None, 405, []),
])
def test_api_unknown_things_and_bad_values(guarded, method, path, body, status, words):
    CASES["api unknown/bad values"] += 1
    assert_api_error(guarded.request(method, path, json=body), *words, statuses=[status])
