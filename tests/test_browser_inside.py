"""The Look inside tab and the training samples in a real browser (Debian's Chromium, Playwright),
on freshly trained tiny models: each view is driven the way a person would and photographed
(to a temp folder, or to $AZR_SCREENSHOTS, to look at them)."""

import os
from pathlib import Path

import httpx
import pytest

from conftest import TINY
from test_browser import CHROMIUM, module_value, page, server, wait_for_module  # noqa: F401  the same fixtures

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"),
]
TRAIN = dict(batch_size=8, eval_every=10, warmup_steps=5, compile="off")


def train_and_wait(url, model, **opts):
    assert httpx.post(f"{url}/train", json={"model": model, "book": "example", **TRAIN, **opts}).status_code == 202
    while (job := httpx.get(f"{url}/training_status").json())["state"] in ("queued", "running"):
        pass
    assert job["state"] == "done", job


def test_samples_and_every_look_inside_view(server, page, tmp_path, book_text):  # noqa: F811
    shots = Path(os.environ.get("AZR_SCREENSHOTS") or tmp_path / "screens")
    shots.mkdir(parents=True, exist_ok=True)
    httpx.post(f"{server}/upload_book", files={"file": ("example.txt", book_text.encode())}).raise_for_status()
    for name, vocab in (("web", 512), ("wide", 320)):
        httpx.post(f"{server}/create_model", json={"name": name, **TINY, "vocab_size": vocab}).raise_for_status()

    # Training: a sample of the same prompt at every evaluation, as a timeline
    page.goto(server + "/#training")
    page.select_option("#train-form [name=model]", "web")
    for field, value in dict(steps=40, batch_size=8, eval_every=10, warmup_steps=5, sample_tokens=24).items():
        page.fill(f"#train-form [name={field}]", str(value))
    page.fill("#train-form [name=sample_prompt]", "The keeper")
    page.click("#train-start")
    page.wait_for_selector("#job-state.done", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#samples .sample').length === 4")
    # newest first: the last evaluation's sample opens the list, the first one ends it
    assert page.text_content("#samples .sample >> nth=0").startswith("step 40: The keeper")
    assert page.text_content("#samples .sample >> nth=3").startswith("step 10: The keeper")
    page.locator("#tab-training .charts").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "6-training-samples.png"), full_page=True)

    # a second run of web (another learning rate: a second version) and one of the other model
    train_and_wait(server, "web", steps=20, learning_rate=1e-3)
    train_and_wait(server, "wide", steps=20)
    page.reload()  # the page learns of the new runs and versions
    page.click("#tabs button[data-tab=inside]")
    page.select_option("#inside-form [name=model]", "web")

    # Tokenizer: the same text under two tokenizers, side by side
    page.select_option("#tokens-form [name=compare]", "wide")
    page.click("#tokens-form button[type=submit]")
    page.wait_for_selector("#tokens-out .side >> nth=1")
    assert "bytes per token" in page.text_content("#tokens-out") and page.locator("#tokens-out .chunk").count() > 10
    page.select_option("#tokens-form [name=book]", "example")
    page.click("#tokens-form button[type=submit]")
    page.wait_for_selector("#tokens-out:has-text('most common tokens make up')")
    page.locator("#look-tokens").screenshot(path=str(shots / "7-inside-tokenizer.png"))

    # Next token: changing top-k updates the bars at once, cutting tokens
    page.wait_for_selector("#next-out .bar-row")
    assert page.locator("#next-out .bar-row.cut").count() == 0  # top-k 50 keeps every bar shown
    page.fill("#next-form [name=top_k]", "5")
    page.wait_for_selector("#next-out .bar-row.cut")
    assert "sampling can pick 5 of 512" in page.text_content("#next-out")
    page.locator("#look-next").screenshot(path=str(shots / "8-inside-next-token.png"))

    # Embeddings: the map of an earlier version
    wait_for_module(page, "inside_maps.js", "m.embedPlot.points.length > 0")
    page.select_option("#embed-form [name=version]", "v001")
    wait_for_module(page, "inside_maps.js", "m.embedPlot.title.includes('v001')")
    page.locator("#look-embed").screenshot(path=str(shots / "9-inside-embeddings.png"))

    # NF4: another layer
    page.select_option("#nf4-form [name=layer]", "transformer.h.1.mlp.c_fc")
    wait_for_module(page, "inside_maps.js", "m.nf4.view && m.nf4.view.layer === 'transformer.h.1.mlp.c_fc'")
    assert "bits per weight" in page.text_content("#nf4-numbers")
    page.locator("#look-nf4").screenshot(path=str(shots / "10-inside-nf4.png"))

    # Runs: both runs of web and the run of wide on one chart
    page.select_option("#runs-form [name=compare]", "wide")
    page.wait_for_function("document.querySelectorAll('#runs-table tr').length === 4")
    assert module_value(page, "inside_maps.js", "m.runCharts[1].series.length") == 3
    assert "learning_rate=0.001" in page.text_content("#runs-table")
    page.locator("#look-runs").screenshot(path=str(shots / "11-inside-runs.png"))
