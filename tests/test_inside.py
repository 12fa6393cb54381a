"""The look-inside views (inside.py) and their endpoints (/inside/...): each view's numbers check
out against the model, the tokenizer or quant.py they come from, and every bad input is a 4xx.
Also the samples the trainer writes at each evaluation."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app import inside
import quant
from app import runs
from azr_trainer import TrainConfig
from conftest import LOCAL_URL, TINY, quick_train_config, tiny_config
from files import NotFound
from generate import SamplingConfig
from server import create_app
from app.store import Store
from test_server import error_of, train, wait_for

@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, book_text):
    """A tiny model trained for 20 steps, for the tests that only look at it: (store, name)."""
    store = Store(tmp_path_factory.mktemp("home"))
    store.books.add("book", book_text.encode("utf-8"), "book.txt")
    store.create_model("tiny", tiny_config())
    runs.train(store, "tiny", ["book"], quick_train_config())
    return store, "tiny"


# ----------------------------------------------------------------------------- samples while training


def test_each_evaluation_writes_a_sample_of_the_books_first_line(trained_once, book_text):
    store, name = trained_once
    rows = store.metrics(name)
    samples = {r["step"]: r["sample"] for r in rows if "sample" in r}
    assert sorted(samples) == [r["step"] for r in rows if "val_bpb" in r] == [10, 20]
    assert {s["prompt"] for s in samples.values()} == {book_text.splitlines()[0].strip()}
    assert all(s["text"] for s in samples.values())


def test_a_sample_depends_only_on_the_weights(trained_once):
    store, name = trained_once
    model, tok = store.load_model(name).eval(), store.tokenizer(name)
    sample = runs.sampler(tok, "The keeper", quick_train_config(sample_tokens=12), "cpu")
    torch.manual_seed(0)
    first = sample(model)
    torch.manual_seed(1)  # another global RNG state: the same text (the sampler has its own seed)
    assert sample(model) == first and first["prompt"] == "The keeper"


def test_sample_options_turn_samples_off_or_set_the_prompt(store, book):
    store.create_model("off", tiny_config())
    runs.train(store, "off", [book], quick_train_config(sample_tokens=0))
    assert not any("sample" in r for r in store.metrics("off"))
    store.create_model("own", tiny_config())
    runs.train(store, "own", [book], quick_train_config(sample_prompt="Once"))
    assert [r["sample"]["prompt"] for r in store.metrics("own") if "sample" in r] == ["Once", "Once"]
    with pytest.raises(ValueError, match="sample_prompt must be at most 500 characters"):
        TrainConfig(sample_prompt="x" * 501).validate()


def test_a_model_wider_than_its_tokenizer_writes_and_shows_only_real_tokens(store, book):
    store.create_model("wide", tiny_config(vocab_size=4000))  # the 40 KB book gives BPE fewer merges than that
    runs.train(store, "wide", [book], quick_train_config(steps=10, sample_tokens=64))
    tok, model = store.tokenizer("wide"), store.load_model("wide").eval()
    assert tok.vocab_size < 4000 and store.metrics("wide")[-1]["sample"]["text"]
    v = inside.next_token_view(model, tok, "The", SamplingConfig(temperature=1.0, top_k=0, top_p=1.0))
    assert v["vocab_size"] == v["kept"] == tok.vocab_size


def test_first_line_is_a_short_prompt():
    assert runs.first_line("\n\n  The Almanac  \nChapter 1") == "The Almanac"
    assert runs.first_line("word " * 40) == ("word " * 16).strip()  # cut at a word, within 80 characters


# ----------------------------------------------------------------------------- the views, as a library


def test_tokenizer_view_chunks_spell_the_text_and_count_the_book(trained_once):
    store, name = trained_once
    tok = store.tokenizer(name)
    text = "The keeper climbed the stairs. Ёж"
    v = inside.tokenizer_view(store, tok, text, "book")
    assert b"".join(tok.token_bytes(t["id"]) for t in v["tokens"]) == text.encode()
    assert v["n_tokens"] == len(tok.encode(text)) and v["bytes_per_token"] == v["n_bytes"] / v["n_tokens"]
    b = v["book"]
    assert b["n_tokens"] == len(tok.encode(store.books.text("book")))
    assert b["n_bytes"] == len(store.books.text("book").encode()) and 0.3 < b["common_share"] < 1
    merges = v["longest_merges"]
    assert all(m["result"] == m["left"] + m["right"] for m in merges)
    assert [len(m["result"].encode()) for m in merges] == sorted((len(m["result"].encode()) for m in merges), reverse=True)


def test_half_a_character_is_shown_as_its_bytes():
    assert inside.shown_bytes("é".encode()[:1]) == "\\xc3" and inside.shown_bytes(b" the") == " the"


def test_merges_are_the_vocabulary_beyond_the_bytes(trained_once):
    tok = trained_once[0].tokenizer(trained_once[1])
    merges = tok.merges()
    assert len(merges) == tok.vocab_size - 256 - 1  # 256 bytes, the merges, <|endoftext|>
    vocab = {tok.token_bytes(i) for i in range(tok.vocab_size)}
    assert all(a + b in vocab for a, b in merges)


def test_next_token_view_shows_the_models_probabilities_and_what_sampling_keeps(trained_once):
    store, name = trained_once
    model, tok = store.load_model(name).eval(), store.tokenizer(name)
    logits = model(torch.tensor([tok.encode("The sea")]))[0][0, -1]
    v = inside.next_token_view(model, tok, "The sea", SamplingConfig(temperature=1.0, top_k=3, top_p=1.0), bars=10)
    first = v["tokens"][0]
    assert first["id"] == logits.argmax().item() and first["p"] == pytest.approx(logits.softmax(-1).max().item(), rel=1e-5)
    assert v["kept"] == 3 and [t["cut"] for t in v["tokens"]][:4] == [None, None, None, "top-k"]
    assert sum(t["p_sample"] for t in v["tokens"]) == pytest.approx(1, abs=1e-5)
    hot = inside.next_token_view(model, tok, "The sea", SamplingConfig(temperature=2.0, top_k=0, top_p=1.0))
    assert hot["kept"] == tok.vocab_size and hot["tokens"][0]["p_sample"] < hot["tokens"][0]["p"]  # flatter
    greedy = inside.next_token_view(model, tok, "The sea", SamplingConfig(temperature=0))
    assert greedy["kept"] == 1 and greedy["tokens"][0]["p_sample"] == 1.0
    nucleus = inside.next_token_view(model, tok, "The sea", SamplingConfig(temperature=1.0, top_k=0, top_p=1e-6))
    assert nucleus["kept"] == 1 and nucleus["tokens"][1]["cut"] == "top-p"


def test_embedding_map_puts_the_commonest_tokens_on_their_principal_axes(trained_once):
    store, name = trained_once
    model, tok = store.load_model(name), store.tokenizer(name)
    counts = inside.token_counts(store, tok, "book")
    v = inside.embedding_map(model, tok, counts, 50)
    pts = v["points"]
    assert len(pts) == 50 and [p["count"] for p in pts] == sorted(counts, reverse=True)[:50]
    assert v["explained"][0] >= v["explained"][1] > 0 and sum(v["explained"]) < 1
    xs, ys = np.array([p["x"] for p in pts]), np.array([p["y"] for p in pts])
    assert xs.var() >= ys.var() and pts[0]["x"] >= 0 and pts[0]["y"] >= 0  # the commonest token: positive side
    assert abs(xs.mean()) < 1e-5  # centred


def test_nf4_view_shows_the_numbers_quant_computes(trained_once):
    store, name = trained_once
    model = store.load_model(name)
    v = inside.nf4_view(model, "transformer.h.1.mlp.c_fc")
    w = model.get_submodule("transformer.h.1.mlp.c_fc").weight
    assert v["shape"] == [64, 32] and v["params"] == w.numel()
    assert sum(v["histogram"]) == w.numel() and sum(v["level_share"]) == pytest.approx(1)
    assert v["rel_frobenius"] == pytest.approx(quant.quantization_error(w, quant.quantize_nf4(w))["rel_frobenius"])
    assert 4 < v["bits_per_weight"] < 4.5 and v["bytes_before"] == 4 * w.numel() > v["bytes_after"]
    assert v["whole_model"]["quantized_layers"] == len(v["layers"]) == 8
    assert inside.nf4_view(model)["layer"] == "transformer.h.0.attn.c_attn"
    with pytest.raises(NotFound, match="no layer 'lm_head'"):
        inside.nf4_view(model, "lm_head")  # tied to the embedding: never quantized


def test_run_curves_give_each_run_its_curves_and_settings(trained, book):
    store, name = trained
    runs.train(store, name, [book], quick_train_config(steps=10, learning_rate=1e-3))
    first, second = inside.run_curves(store, [name])["runs"]
    assert [len(first["loss"]), len(second["loss"])] == [20, 10]
    assert first["val_bpb"][-1][0] == 20 and second["config"]["learning_rate"] == 1e-3
    assert first["status"] == "done" and first["best"][0] == min(y for _, y in first["val_bpb"])


def test_window_means_thin_a_long_curve_and_keep_its_mean():
    xy = [(i, float(i % 7)) for i in range(1, 1001)]
    thin = inside.window_means(xy, 400)
    assert len(thin) <= 400 and thin[-1][0] == 1000
    assert np.mean([y for _, y in thin]) == pytest.approx(np.mean([y for _, y in xy]), rel=0.01)


def test_a_version_is_one_the_lineage_names(trained_once):
    store, name = trained_once
    assert store.load_model(name, version="v001") is not None
    for version in ("v999", "../../books/book"):
        with pytest.raises(NotFound, match="has no version"):
            store.load_model(name, version=version)


# ----------------------------------------------------------------------------- the endpoints


@pytest.fixture(scope="module")
def api(tmp_path_factory, book_text):
    """An app with model tiny trained twice (versions v001, v002), model wide (another vocabulary)
    trained once, and model fresh, never trained."""
    with TestClient(create_app(tmp_path_factory.mktemp("inside")), base_url=LOCAL_URL) as c:
        c.post("/upload_book", files={"file": ("book.txt", book_text.encode())})
        for name, vocab in (("tiny", 512), ("wide", 320), ("fresh", 512)):
            c.post("/create_model", json={"name": name, **TINY, "vocab_size": vocab})
        for name, lr in (("tiny", 5e-4), ("tiny", 2e-3), ("wide", 5e-4)):
            train(c, name, "book", learning_rate=lr)
            assert wait_for(c)["state"] == "done"
        yield c


def test_tokens_endpoint_cuts_text_under_two_tokenizers(api):
    text = "The keeper climbed the stairs of the lighthouse."
    a, b = (api.post("/inside/tokens", json={"model": m, "text": text}).json() for m in ("tiny", "wide"))
    assert a["vocab_size"] == 512 and b["vocab_size"] == 320 and a["n_tokens"] < b["n_tokens"]  # more merges, fewer tokens
    with_book = api.post("/inside/tokens", json={"model": "tiny", "book": "book"}).json()
    assert with_book["book"]["name"] == "book" and with_book["n_bytes"] >= inside.BOOK_TEXT_SHOWN  # its start


@pytest.mark.parametrize("body, status, words", [
    ({"model": "ghost", "text": "hi"}, 404, "no model named"),
    ({"model": "fresh", "text": "hi"}, 409, "train it on a book first"),
    ({"model": "tiny", "book": "ghost"}, 404, "no book named"),
    ({"model": "tiny", "book": "../secret"}, 400, "invalid book name"),
    ({"model": "tiny", "text": ""}, 400, "paste a text or pick a book"),
    ({"model": "tiny", "text": "x" * 20_001}, 422, "at most 20000 characters"),
])
def test_tokens_endpoint_rejects(api, body, status, words):
    assert words in error_of(api.post("/inside/tokens", json=body), status)


def test_next_token_endpoint_follows_the_sampling_settings(api):
    body = {"model": "tiny", "prompt": "The sea", "bars": 5}
    wide = api.post("/inside/next_token", json={**body, "top_k": 0, "top_p": 1.0}).json()
    narrow = api.post("/inside/next_token", json={**body, "top_k": 2}).json()
    assert wide["kept"] == 512 and narrow["kept"] == 2 and len(narrow["tokens"]) == 5
    assert [t["p"] for t in wide["tokens"]] == [t["p"] for t in narrow["tokens"]]  # the model's part does not move


@pytest.mark.parametrize("change, status, words", [
    ({"model": "ghost"}, 404, "no model named"),
    ({"adapter": "ghost"}, 404, "has no adapter"),
    ({"temperature": -1}, 400, "temperature must be between 0.0 and 5.0"),
    ({"top_p": "high"}, 422, "top_p"),
    ({"bars": 0}, 422, "bars"),
    ({"prompt": "x" * 100_001}, 422, "at most 100000 characters"),
])
def test_next_token_endpoint_rejects(api, change, status, words):
    assert words in error_of(api.post("/inside/next_token", json={"model": "tiny", "prompt": "The", **change}), status)


def test_embeddings_endpoint_maps_each_version(api):
    now = api.get("/inside/embeddings", params={"model": "tiny", "n": 30}).json()
    v1 = api.get("/inside/embeddings", params={"model": "tiny", "n": 30, "version": "v001"}).json()
    assert now["book"] == "book" and len(now["points"]) == 30 and v1["version"] == "v001"
    assert [p["id"] for p in now["points"]] == [p["id"] for p in v1["points"]]  # the same tokens...
    assert [p["x"] for p in now["points"]] != [p["x"] for p in v1["points"]]  # ...moved by the second run


@pytest.mark.parametrize("params, status, words", [
    ({"model": "ghost"}, 404, "no model named"),
    ({"model": "tiny", "version": "v009"}, 404, "has no version 'v009'"),
    ({"model": "tiny", "version": "../../../etc"}, 404, "has no version"),
    ({"model": "tiny", "book": "ghost"}, 404, "no book named"),
    ({"model": "tiny", "n": 2}, 422, "n:"),
    ({"model": "fresh"}, 409, "train it on a book first"),
])
def test_embeddings_endpoint_rejects(api, params, status, words):
    assert words in error_of(api.get("/inside/embeddings", params=params), status)


def test_nf4_endpoint_quantizes_any_layer_also_of_an_untrained_model(api):
    v = api.get("/inside/nf4", params={"model": "tiny", "layer": "transformer.h.1.attn.c_proj"}).json()
    assert v["layer"] == "transformer.h.1.attn.c_proj" and len(v["levels"]) == 16 and v["model"] == "tiny"
    fresh = api.get("/inside/nf4", params={"model": "fresh"}).json()
    assert fresh["layer"] == fresh["layers"][0] and fresh["bits_per_weight"] > 4
    assert "no layer 'lm_head'" in error_of(api.get("/inside/nf4", params={"model": "tiny", "layer": "lm_head"}), 404)
    assert "no model named" in error_of(api.get("/inside/nf4", params={"model": "ghost"}), 404)


def test_runs_endpoint_lists_the_runs_of_two_models(api):
    r = api.get("/inside/runs", params=[("model", "tiny"), ("model", "wide")]).json()["runs"]
    assert [(x["model"], x["config"]["learning_rate"]) for x in r] == [("tiny", 5e-4), ("tiny", 2e-3), ("wide", 5e-4)]
    assert all(len(x["loss"]) == 20 and [s for s, _ in x["val_bpb"]] == [10, 20] for x in r)
    assert api.get("/inside/runs", params={"model": "fresh"}).json() == {"runs": []}
    assert "no model named" in error_of(api.get("/inside/runs", params={"model": "ghost"}), 404)
    assert "at most 4 models" in error_of(api.get("/inside/runs", params=[("model", "tiny")] * 5), 400)
    assert "model" in error_of(api.get("/inside/runs"), 422)


def test_train_endpoint_takes_the_sample_options(api):
    r = api.post("/train", json={"model": "tiny", "book": "book", "sample_prompt": "x" * 501})
    assert r.json()["field"] == "sample_prompt" and "at most 500" in error_of(r, 400)
    rows = api.get("/models/tiny/metrics").json()["rows"]
    assert rows[9]["sample"]["text"] and "sample" not in rows[8]
