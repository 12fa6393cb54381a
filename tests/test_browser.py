"""The whole flow in a real browser: Debian's Chromium, driven by Playwright, against a real
server process. Create a model, upload a book, train, watch the chart, generate, download.

A screenshot of each tab goes to a temp folder (or to $AZR_SCREENSHOTS, to look at them)."""

import os
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import TINY
from test_server import free_port, start_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = start_server(tmp_path / "home", port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


# 4xx answers the page asks for and handles: a bad config while typing, the time probe while a job
# runs, the self-play rollout before the first self-play step. Any other 4xx, a 5xx, a failed asset
# (a missing favicon) or a console error fails the test.
EXPECTED_4XX = {("/estimate", 400), ("/step_time", 409), ("/selfplay_example", 404)}


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        errors, bad = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # a failed request is logged as "Failed to load resource": judged by its answer below
        page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                and errors.append(m.text))
        page.on("response", lambda r: r.status >= 400 and bad.append((r.url, r.status)))
        yield page
        browser.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"
        unexpected = [(url, status) for url, status in bad
                      if not any(url.split("?")[0].endswith(p) and status == s for p, s in EXPECTED_4XX)]
        assert unexpected == [], f"failed requests: {unexpected}"


def module_value(page, module, expr):
    """`expr` about the page's ES module static/`module` (bound as m): the same instance the page runs."""
    return page.evaluate(f"async () => {{ const m = await import('/static/{module}'); return {expr}; }}")


def wait_for_module(page, module, expr, timeout_s=30):
    deadline = time.time() + timeout_s
    while not module_value(page, module, expr):
        assert time.time() < deadline, f"timed out waiting for {module}: {expr}"
        page.wait_for_timeout(100)


def test_create_upload_train_generate_download(server, page, tmp_path, book_text):
    shots = Path(os.environ.get("AZR_SCREENSHOTS") or tmp_path / "screens")
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server)

    # Create model: the estimate follows the fields; a bad value is explained before submit
    page.click("#tabs button[data-tab=create]")
    page.fill("#create-form [name=name]", "web")
    for field, value in dict(vocab_size=512, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32).items():
        page.fill(f"#create-form [name={field}]", str(value))
    page.wait_for_selector("#estimate:has-text('k parameters')")  # ~43 k for this tiny config
    page.fill("#create-form [name=num_heads]", "3")
    page.wait_for_selector("text=must be divisible by num_heads")
    page.screenshot(path=str(shots / "1b-create-invalid.png"), full_page=True)
    assert page.locator("#create-form input.invalid").evaluate_all("l => l.map(i => i.name)") == ["num_heads"]
    page.fill("#create-form [name=num_heads]", "2")
    page.fill("#create-form [name=d_model]", "33")  # the message names both: the field typed in is marked
    page.wait_for_selector("#create-form [name=d_model].invalid")
    assert page.locator("#create-form input.invalid").evaluate_all("l => l.map(i => i.name)") == ["d_model"]
    page.fill("#create-form [name=d_model]", "32")
    page.wait_for_function("!document.querySelector('#estimate').classList.contains('bad')")
    page.screenshot(path=str(shots / "1-create.png"), full_page=True)
    page.click("#create-form button[type=submit]")
    page.wait_for_selector("#create-msg:has-text('Created web')")

    # Books: upload a slice of the example book
    book = tmp_path / "example.txt"
    book.write_text(book_text, encoding="utf-8")
    page.click("#tabs button[data-tab=books]")
    page.set_input_files("#upload-form [name=file]", str(book))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#books-table td:has-text('example')")
    assert "utf-8" in page.text_content("#upload-msg")
    page.screenshot(path=str(shots / "2-books.png"), full_page=True)

    # Training: a few iterations; the job runs in the server and the chart fills in
    page.click("#tabs button[data-tab=training]")
    page.select_option("#train-form [name=model]", "web")
    page.fill("#train-form [name=steps]", "60")
    page.fill("#train-form [name=batch_size]", "8")
    page.fill("#train-form [name=eval_every]", "10")
    page.fill("#train-form [name=warmup_steps]", "5")
    assert page.is_checked("#train-books input[value=example]")
    # before Start, the page says what the run will cost on this machine (a short timed probe)
    page.wait_for_function("document.querySelector('#train-estimate').textContent.includes('60 steps take')",
                           timeout=60_000)
    assert "per 1000 steps on this machine" in page.text_content("#train-estimate")
    page.click("#train-start")
    page.wait_for_selector("#job-state.queued, #job-state.running, #job-state.done", timeout=60_000)
    page.reload()  # the job lives in the server, not in the tab: the reloaded page finds it
    assert page.is_visible("#tab-training")
    page.wait_for_selector("#job-state.done", timeout=120_000)
    wait_for_module(page, "progress.js", "m.charts[0].series[0].points.length === 60 && "
                                         "m.charts[1].series[0].points.length === 6")
    assert "done" in page.text_content("#train-log")
    page.screenshot(path=str(shots / "3-training.png"), full_page=True)

    # LoRA: fine-tune an adapter of the trained model (its weights stay frozen)
    page.check("#train-form [name=mode][value=lora]")
    page.fill("#train-form [name=adapter]", "poems")
    page.fill("#train-form [name=steps]", "10")
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#job-title').textContent.includes('adapter poems')"
                           " && document.querySelector('#job-state').textContent === 'done'", timeout=120_000)
    page.screenshot(path=str(shots / "3b-training-lora.png"), full_page=True)

    # Generation: streamed tokens, coloured, with a top-5 tooltip; then the attention heatmap
    page.click("#tabs button[data-tab=generation]")
    page.select_option("#gen-form [name=model]", "web")
    page.select_option("#gen-form [name=adapter]", "poems")
    page.fill("#gen-form [name=max_new_tokens]", "40")
    page.fill("#gen-form [name=seed]", "1")
    page.click("#gen-start")
    page.wait_for_selector("#gen-stats:has-text('tokens in')")
    assert page.locator("#gen-output .tok").count() > 5
    page.hover("#gen-output .tok >> nth=2")
    assert page.is_visible("#tooltip") and "%" in page.text_content("#tooltip")
    page.screenshot(path=str(shots / "4b-token-view.png"), clip={"x": 0, "y": 380, "width": 1280, "height": 320})
    page.select_option("#attn-form [name=layer]", "1")
    page.click("#attn-form button[type=submit]")
    page.wait_for_selector("#attn-info:has-text('layer 1')")
    page.screenshot(path=str(shots / "4-generation.png"), full_page=True)

    # Models: the table, details with versions, the arena, and the zip download
    page.click("#tabs button[data-tab=models]")
    page.wait_for_selector("#models-table td:has-text('web')")
    page.click("#models-table a:has-text('web')")
    page.wait_for_selector("#model-detail:has-text('v001')")
    assert "poems" in page.text_content("#model-detail")
    page.select_option("#arena-form [name=adapter_b]", "poems")
    page.select_option("#arena-form [name=book]", "example")
    page.click("#arena-form button[type=submit]")
    page.wait_for_selector("#arena-out:has-text('bits per byte on example')")
    page.screenshot(path=str(shots / "5-models.png"), full_page=True)
    for where, label, filename, inside in [
            ("#models-table", "this app's zip", "web.zip", "web/model.safetensors"),
            ("#models-table", "Hugging Face folder (zip)", "web-hf.zip", "web-hf/config.json"),
            ("#models-table", "GGUF", "web-f32.gguf", None),
            ("#model-detail", "PEFT folder (zip)", "poems-peft.zip", "poems-peft/adapter_config.json")]:
        with page.expect_download() as d:
            page.click(f"{where} a:has-text(\"{label}\")")
        path = tmp_path / d.value.suggested_filename
        d.value.save_as(path)
        assert path.name == filename
        assert inside in zipfile.ZipFile(path).namelist() if inside else path.read_bytes()[:4] == b"GGUF"

    # delete, confirming the dialog
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#models-table button:has-text('Delete')")
    page.wait_for_selector("#models-table td:has-text('no models yet')")


def test_a_damaged_model_is_listed_with_what_to_do_and_can_be_deleted(server, page, tmp_path):
    from conftest import tiny_config
    from app.store import Store

    store = Store(tmp_path / "home")  # the server's data folder
    for name in ("good", "bad"):
        store.create_model(name, tiny_config())
    (store.model_dir("bad") / "lineage.json").write_text('{"name": "bad", "runs": [')
    page.goto(server)
    page.click("#tabs button[data-tab=models]")
    page.wait_for_selector("#models-table tr.damaged:has-text('bad/lineage.json is damaged')")
    assert page.is_visible("#models-table a:has-text('good')")
    assert page.locator("#arena-form [name=model_a] option").all_text_contents() == ["good"]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#models-table tr.damaged button:has-text('Delete')")
    page.wait_for_selector("#models-msg:has-text('deleted bad')")
    assert page.locator("#models-table tr.damaged").count() == 0


def test_a_damaged_book_is_listed_with_what_to_do_and_can_be_deleted(server, page, tmp_path, book_text):
    from app.store import Store

    store = Store(tmp_path / "home")
    for name in ("good", "bad"):
        store.books.add(name, book_text[:3000].encode(), f"{name}.txt")
    (store.home / "books" / "bad.json").write_text("[]")
    page.goto(server)
    page.click("#tabs button[data-tab=books]")
    page.wait_for_selector("#books-table tr.damaged:has-text('books/bad.json is damaged')")
    assert page.locator("#train-books input").evaluate_all("boxes => boxes.map(b => b.value)") == ["good"]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#books-table tr.damaged button:has-text('Delete')")
    page.wait_for_function("!document.querySelector('#books-table tr.damaged')")
    assert page.is_visible("#books-table td:has-text('good')")


def test_docs_work_without_the_internet(server, page):
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server) else route.abort())
    page.goto(server + "/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('AZR Model Trainer')")
    assert page.locator(".opblock-summary-path:has-text('/generate_stream')").count() == 1


def test_the_stream_reader_skips_keep_alive_pings(server, page):
    page.goto(server)
    seen = page.evaluate("""async () => {
        const {readEvents} = await import("/static/api.js");
        const seen = [];
        const body = ': ping\\n\\ndata: {"text": "a"}\\n\\n: ping\\n\\nevent: done\\ndata: {"tokens": 1}\\n\\n';
        await readEvents(new Response(body), (type, data) => seen.push([type, data]));
        return seen;
    }""")
    assert seen == [["message", {"text": "a"}], ["done", {"tokens": 1}]]


# An original Polish text (written for this test): its first line is what a Polish model's prompts start from.
POLISH = "Opowieść o starym latarniku\n\n" + (
    "Stary latarnik wchodził każdego ranka na szczyt wieży i patrzył na morze. Mewy krążyły nad skałami, "
    "a żona latarnika piekła chleb i śpiewała cicho o dalekich wyspach. Dzieci biegały po plaży, "
    "zbierając muszle, kamienie i kawałki drewna. Wieczorem zapalał światło, które świeciło daleko "
    "nad ciemną wodą.\n") * 120


def test_a_newcomers_first_hour(server, page, tmp_path, book_text):
    """What a new user meets: a self-play run and then a run without it, a time budget that says
    how far it is and why it ended, a reload, the newest sample on top, prompts in the book's
    language, the Layer list filled, every tab visited without an error (the fixture checks)."""
    shots = Path(os.environ.get("AZR_SCREENSHOTS") or tmp_path / "screens")
    shots.mkdir(parents=True, exist_ok=True)
    for name, text in (("example", book_text), ("latarnik", POLISH)):
        httpx.post(f"{server}/upload_book", files={"file": (f"{name}.txt", text.encode())}).raise_for_status()
    for name in ("pl", "web"):  # "pl" comes first in every list: the page must not fall back to it
        httpx.post(f"{server}/create_model", json={"name": name, **TINY}).raise_for_status()
    selfplay_run = {"model": "pl", "book": "latarnik", "steps": 30, "eval_every": 10, "selfplay_every": 2,
                    "selfplay_start": 0.3, "compile": "off"}
    httpx.post(f"{server}/train", json=selfplay_run).raise_for_status()
    while httpx.get(f"{server}/training_status").json()["state"] in ("queued", "running"):
        time.sleep(0.2)

    # the self-play run: its rollout is shown; the Polish book is listed as Polish
    page.goto(server + "/#books")
    page.wait_for_selector("#books-table td:has-text('Polish (pl)')")
    page.click("#tabs button[data-tab=training]")
    page.wait_for_selector("#selfplay-view:not([hidden]) .tok")

    # a two-minute budget, scaled down: a run without self-play on the other model
    page.select_option("#train-form [name=model]", "web")
    page.uncheck("#train-books input[value=latarnik]")
    page.check("#train-books input[value=example]")
    for field, value in dict(minutes=0.15, batch_size=8, eval_every=40, patience=0).items():
        page.fill(f"#train-form [name={field}]", str(value))
    page.uncheck("#train-form [name=selfplay]")
    page.click("#train-start")
    page.wait_for_selector("#train-msg:has-text('Training started: web on example (job ')")
    page.wait_for_function("/\\d:\\d\\d \\/ 0:09 of the time budget/"
                           ".test(document.querySelector('#job-line').textContent)", timeout=30_000)
    assert page.is_hidden("#selfplay-view")  # the previous run's rollout is not this run's
    assert "Self-play is off for this run" in module_value(page, "progress.js", "m.charts[2].empty")
    # one number for the run's length: the status and the estimate box say the same projected total
    total, estimate = page.evaluate("[document.querySelector('#job-line').textContent.match(/of ≈ ([\\d,]*\\d)/)[1],"
                                    " document.querySelector('#train-estimate').textContent]")
    assert f"≈ {total} steps fit the 0.15-minute budget" in estimate
    page.screenshot(path=str(shots / "12-budget-running.png"), full_page=True)
    page.wait_for_selector("#job-state.done", timeout=60_000)
    assert "the 0.15-minute time budget ran out" in page.text_content("#job-end")
    assert "the time budget ran out" in page.text_content("#train-log")

    # a reload on #training: the form shows the job's model (not the first one), the estimate is filled
    page.goto(server + "/#training")
    page.reload()
    page.wait_for_selector("#job-title:has-text('web on example')")
    assert page.input_value("#train-form [name=model]") == "web"
    assert page.is_checked("#train-books input[value=example]")  # and the job's books
    assert not page.is_checked("#train-books input[value=latarnik]")
    page.wait_for_function("document.querySelector('#train-estimate').textContent.includes('per 1000 steps')",
                           timeout=60_000)
    # the newest sample opens the list, in view without scrolling
    page.wait_for_selector("#samples .sample")
    heads = page.locator("#samples .sample strong").all_text_contents()  # "step 1,040: "
    steps = [int(t.split()[1].strip(":").replace(",", "")) for t in heads]
    assert steps == sorted(steps, reverse=True) and len(steps) > 1
    page.locator("#samples").scroll_into_view_if_needed()
    newest, box = page.locator("#samples .sample >> nth=0").bounding_box(), page.locator("#samples").bounding_box()
    assert box["y"] <= newest["y"] and newest["y"] + newest["height"] <= box["y"] + box["height"]
    page.screenshot(path=str(shots / "13-training-after-reload.png"), full_page=True)

    # Generation: the Layer list is filled on the first visit, no empty canvas; a Polish prompt for the Polish model
    page.click("#tabs button[data-tab=generation]")
    assert page.input_value("#attn-form [name=layer]") == "0"
    assert page.locator("#attn-form [name=layer] option").count() == TINY["num_layers"]
    assert page.is_hidden("#attn-canvas")
    page.select_option("#gen-form [name=model]", "pl")
    assert page.input_value("#gen-form [name=prompt]") == "Opowieść o starym latarniku"
    page.fill("#gen-form [name=max_new_tokens]", "30")
    page.fill("#gen-form [name=temperature]", "0")
    page.click("#gen-start")
    page.wait_for_selector("#gen-stats:has-text('tokens in')")
    assert not page.is_disabled("#gen-copy")
    with page.expect_download() as d:
        page.click("#gen-download")
    assert d.value.suggested_filename == "pl.txt"
    page.screenshot(path=str(shots / "14-generation-polish.png"), full_page=True)

    # Models: the arena says greedy has no seed and scores how much each side loops
    page.click("#tabs button[data-tab=models]")
    page.select_option("#arena-form [name=model_a]", "pl")
    assert page.input_value("#arena-form [name=prompt]") == "Opowieść o starym latarniku"
    page.fill("#arena-form [name=max_new_tokens]", "40")
    page.fill("#arena-form [name=temperature]", "0")
    page.click("#arena-form button[type=submit]")
    page.wait_for_selector("#arena-msg:has-text('greedy')")
    assert page.locator("#arena-out:has-text('of its 4-token pieces repeat')").count() == 1
    page.screenshot(path=str(shots / "15-arena.png"), full_page=True)

    # Look inside the Polish model: its texts start from its book too
    page.click("#tabs button[data-tab=inside]")
    page.select_option("#inside-form [name=model]", "pl")
    page.wait_for_selector("#tokens-out .chunk")
    assert page.input_value("#tokens-form [name=text]") == "Opowieść o starym latarniku"
    assert page.input_value("#next-form [name=prompt]") == "Opowieść o starym latarniku"
    page.click("#tabs button[data-tab=create]")
    page.click("#tabs button[data-tab=books]")
