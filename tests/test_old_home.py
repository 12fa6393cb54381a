"""A data folder written before the product moved into app/ (the layout of 2026-12) still loads,
lists and trains. The folder is written here file by file, with the keys that version wrote, so
a change of the format that the code would happily read back from itself still fails here."""

import hashlib
import json

import pytest
import torch

from app import runs
from app.store import Store
from conftest import quick_train_config
from files import save_tensors
from model import GPT, ModelConfig
from tokenizer import Tokenizer

SEED = 7
CONFIG = {"vocab_size": 512, "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64, "max_seq_len": 32,
          "dropout": 0.0}
TRAIN_CONFIG = {"steps": 20, "batch_size": 8, "seq_len": 0, "learning_rate": 0.002, "min_lr_ratio": 0.1,
                "warmup_steps": 5, "weight_decay": 0.1, "grad_clip": 1.0, "grad_accum": 1, "eval_every": 10,
                "eval_batches": 2, "checkpoint_every": 10, "keep_checkpoints": 3, "seed": 1337, "device": "cpu",
                "precision": "fp32", "compile": "auto", "selfplay_every": 0, "selfplay_start": 0.8, "minutes": 0.0,
                "patience": 3, "keep_best": True, "val_fraction": 0.1, "sample_tokens": 32, "sample_prompt": None}


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


@pytest.fixture
def old_home(tmp_path, book_text):
    """models/old/ (config, weights, tokenizer, lineage, metrics), checkpoints/old/run.json of a
    stopped run, and books/book.txt with its .json: as the version before app/ wrote them."""
    home, sha = tmp_path / "home", hashlib.sha256(book_text.encode()).hexdigest()
    m = home / "models" / "old"
    model = GPT(ModelConfig.from_dict(CONFIG), torch.Generator().manual_seed(SEED))
    m.mkdir(parents=True)
    # the state dict without lm_head, which is wte (tied), and a sha256 of the tensors in the header
    save_tensors(m / "model.safetensors", {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    Tokenizer.train([book_text], CONFIG["vocab_size"]).save(m / "tokenizer.json")
    refs = [{"name": "book", "sha256": sha}]
    run = {"run_id": "1a2b3c4d", "books": refs, "steps": 20, "status": "stopped", "date": "2026-12-01T10:05:00",
           "best": [3.1, 20], "world_size": 1, "selfplay_every": 0, "config": TRAIN_CONFIG}
    write_json(m / "lineage.json", {"name": "old", "created": "2026-12-01T10:00:00", "parent": None, "books": refs,
                                    "runs": [run], "steps": 20, "best_val_bpb": 3.1, "versions": []})
    rows = [{"run": "1a2b3c4d", "step": s, "loss": 6.0 - s / 10, "lr": 0.001, "grad_norm": 1.2,
             "time": 1764583200.0 + s} for s in range(1, 21)]
    (m / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_json(m / "config.json", CONFIG)
    write_json(home / "checkpoints" / "old" / "run.json", {
        "run_id": "1a2b3c4d", "books": ["book"], "config": TRAIN_CONFIG, "status": "stopped", "base_steps": 0,
        "started": 1764583200.0, "book_paths": False, "book_refs": refs,
        "params": {"trainable": 34560, "total": 34560, "weight_bytes": 138240}, "step": 20, "world_size": 1})
    (home / "books").mkdir()
    (home / "books" / "book.txt").write_text(book_text, encoding="utf-8")
    n = len(book_text.encode())
    write_json(home / "books" / "book.json", {
        "name": "book", "filename": "book.txt", "bytes": n, "text_bytes": n, "sha256": sha, "encoding": "utf-8",
        "format": "txt", "language": "en", "characters": len(book_text), "replaced": 0, "notes": ["decoded as utf-8"],
        "added": "2026-12-01T09:59:00"})
    return home, model


def test_an_old_home_lists_its_model_and_book(old_home):
    home, _ = old_home
    store = Store(home)
    [model] = store.list_models()
    assert "damaged" not in model and model["name"] == "old" and model["steps"] == 20 and model["has_tokenizer"]
    assert [b["name"] for b in store.books.list()] == ["book"] and "damaged" not in store.books.list()[0]
    assert len(store.metrics("old")) == 20


def test_an_old_model_loads_with_the_weights_it_was_saved_with(old_home):
    home, model = old_home
    loaded = Store(home).load_model("old")
    x = torch.randint(CONFIG["vocab_size"], (1, 16))
    assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])


def test_an_old_run_json_loads_and_is_saved_back_unchanged(old_home, tmp_path):
    home, _ = old_home
    path = home / "checkpoints" / "old" / "run.json"
    run = runs.load_run(Store(home), "old")
    assert (run.status, run.step, run.book_refs[0].name) == ("stopped", 20, "book")
    run.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())


def test_an_old_model_trains_on(old_home):
    home, _ = old_home
    store = Store(home)
    assert runs.train(store, "old", ["book"], quick_train_config(steps=2, eval_every=2))["status"] == "done"
    assert store.lineage("old")["steps"] == 22 and len(store.lineage("old")["runs"]) == 2
