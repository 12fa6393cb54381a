"""The model store: names, atomic files, versions, books."""

import os

import pytest
import torch

from app import store as S
from conftest import tiny_config
from app.store import NotFound, StoreError


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a\x00b", "x" * 65, "dot.name", "ünïcode", "..", " sp"])
def test_bad_names_are_refused_before_touching_disk(store, name):
    with pytest.raises(StoreError, match="invalid model name"):
        store.create_model(name, tiny_config())
    assert not any((store.home / "models").iterdir())


def test_create_load_round_trip(store):
    made = store.create_model("m", tiny_config(), seed=3)
    loaded = store.load_model("m")
    for (k, a), (_, b) in zip(made.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert store.info("m")["params"] == sum(p.numel() for p in loaded.parameters())


def test_duplicate_and_unknown_models_are_clear_errors(store):
    store.create_model("m", tiny_config())
    with pytest.raises(StoreError, match="already exists"):
        store.create_model("m", tiny_config())
    with pytest.raises(NotFound, match="no model named 'nope'"):
        store.load_model("nope")


def test_failed_write_leaves_the_old_file_intact(store, monkeypatch):
    store.create_model("m", tiny_config())
    path = store.model_dir("m") / "model.safetensors"
    before = path.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save_weights("m", S.GPT(tiny_config()))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if "tmp" in p.name] == []  # no litter


def test_versions_and_rollback(store):
    store.create_model("m", tiny_config())
    first = store.load_model("m").state_dict()["transformer.wte.weight"].clone()
    v1 = store.save_version("m")
    store.update_lineage("m", steps=5)
    store.save_weights("m", S.GPT(tiny_config()))  # different random weights
    assert not torch.equal(store.load_model("m").state_dict()["transformer.wte.weight"], first)
    store.rollback("m", v1)
    assert torch.equal(store.load_model("m").state_dict()["transformer.wte.weight"], first)
    assert store.lineage("m")["steps"] == 0
    with pytest.raises(NotFound, match="no version 'v999'"):
        store.rollback("m", "v999")


def test_delete_model_removes_everything(store):
    store.create_model("m", tiny_config())
    store.delete_model("m")
    assert store.list_models() == [] and not (store.home / "models" / "m").exists()


def test_books_are_stored_as_clean_utf8_with_their_story(store):
    raw = ("Глава первая.\r\nСмотритель зажёг лампу в сумерках, как всегда.\r\n" * 20).encode("cp1251")
    info = store.books.add("ru", raw, "ru.txt")
    assert info["encoding"] == "cp1251" and info["language"] == "ru" and info["bytes"] == len(raw)
    assert store.books.text("ru").startswith("Глава первая.\nСмотритель")
    assert [b["name"] for b in store.books.list()] == ["ru"]
    store.books.delete("ru")
    assert store.books.list() == []
    with pytest.raises(NotFound):
        store.books.text("ru")


def test_a_book_dropped_into_the_folder_by_hand_is_listed(store):
    (store.home / "books" / "loose.txt").write_text("A book copied in by hand, line after line.\n" * 10)
    assert [b["name"] for b in store.books.list()] == ["loose"]


def test_home_defaults_to_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("AZR_HOME", str(tmp_path / "h"))
    assert S.Store().home == (tmp_path / "h").resolve()
    assert os.path.isdir(tmp_path / "h" / "models")
