"""Training runs of a model in the store: start one, fine-tune with LoRA, resume, evaluate.

The trainer (azr_trainer.py) knows a model, token arrays and a folder; the store (store.py) knows
where models, books and adapters live. A run connects them in three explicit steps:

1. **Data.** Resolve the books, train the model's tokenizer on them if it has none yet (the
   embeddings are tied to its ids, so later runs reuse it), encode them to token arrays.
2. **Train.** Build the Trainer on the model from the store (with a LoRA adapter attached for a
   fine-tune) and run it; `run.json` and checkpoints go to `checkpoints/<name>/`. At each
   evaluation the model continues one fixed prompt with one fixed seed (`sampler`), so the
   metrics show its writing improve.
3. **Record.** At the end — also when stopped — the weights (or the adapter) go back into the
   store, and the lineage gets the run: books with their sha256, steps, best evaluation.
"""

import json
import shutil
import time

import torch

from azr_trainer import TrainConfig, Trainer, evaluate_bpb, new_run, unigram_bpb
from files import CorruptFile, Exists, NotFound, StoreError, shown
from generate import SamplingConfig, generate
from hardware import pick_device, pick_precision
from lora import LoRAConfig, attach_lora, count_params
from store import check_name, merge_books
from tokenizer import Tokenizer, prepare_tokens


def train(store, name, books, tc, on_event=None, should_stop=None):
    """Start a new run of `tc.steps` steps on `books` (names, or paths from the CLI). -> a summary."""
    tc.validate()
    run = new_run(books, tc, base_steps=store.lineage(name)["steps"])
    for old in store.checkpoint_dir(name).glob("*.safetensors"):  # the previous run's: never resumable now
        old.unlink()
    return run_and_record(store, name, make_trainer(store, name, run), on_event, should_stop)


def finetune(store, name, books, tc, adapter, lc=None, on_event=None, should_stop=None):
    """LoRA fine-tuning (lora.py) of model `name` on `books`: the base stays frozen, in NF4 if
    lc.nf4 (QLoRA), and reuses its tokenizer; only the adapter trains. The run saves
    models/<name>/adapters/<adapter>/ and leaves the base model untouched. -> a summary."""
    tc.validate()
    lc = (lc or LoRAConfig()).validate()
    check_name(adapter, "adapter")
    if store.tokenizer(name) is None:
        raise StoreError(f"model {name!r} has no tokenizer yet: train it on a book before fine-tuning it")
    if adapter in store.list_adapters(name):
        raise Exists(f"model {name!r} already has an adapter {adapter!r}; resume it or pick another name")
    if tc.selfplay_every:
        raise StoreError("self-play is not available for LoRA fine-tuning; set selfplay_every to 0")
    shutil.rmtree(run_dir(store, name, adapter), ignore_errors=True)  # leftovers of a failed attempt
    run = new_run(books, tc, adapter=adapter, lora=lc.to_dict(), base_sha256=store.weights_sha256(name))
    return run_and_record(store, name, make_trainer(store, name, run), on_event, should_stop)


def resume(store, name, on_event=None, should_stop=None, adapter=None):
    """Continue the last unfinished run of `name` (or of its adapter) from its newest good checkpoint."""
    run = load_run(store, name, adapter)
    trainer = make_trainer(store, name, run)
    restored = trainer.restore_latest()
    if restored["skipped"] and on_event:  # say why steps are redone: the newest checkpoint was bad
        on_event({"type": "warning", "message": f"skipped damaged checkpoints ({'; '.join(restored['skipped'])}); "
                                                f"resuming from {restored['path']} (step {restored['step']})"})
    return run_and_record(store, name, trainer, on_event, should_stop)


def load_run(store, name, adapter=None):
    """The run.json of the last run of `name` (or of its adapter), checked to be resumable."""
    path = run_dir(store, name, adapter) / "run.json"
    what = f"adapter {adapter!r} of {name!r}" if adapter else f"model {name!r}"
    if not path.exists():
        raise NotFound(f"{what} has no run to resume; start one with train or finetune")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptFile(f"{shown(path)} of {what} is damaged ({e}); start a new run with train") from e
    if run["status"] == "done":
        raise StoreError(f"the last run of {what} finished; start a new one")
    if adapter and store.weights_sha256(name) != run["base_sha256"]:
        raise StoreError(f"model {name!r} has other weights than when adapter {adapter!r} started; it cannot resume")
    return run


def run_dir(store, name, adapter=None):
    """Where a run keeps run.json and checkpoints; a fine-tune's sit under its base model's."""
    d = store.checkpoint_dir(name)
    return d / "adapters" / check_name(adapter, "adapter") if adapter else d


# ----------------------------------------------------------------------------- building a run


def make_trainer(store, name, run):
    """The Trainer for `run` on model `name`: its weights (+ a fresh LoRA adapter), its data."""
    tc = TrainConfig.from_dict(run["config"])
    device = pick_device(tc.device)
    model = store.load_model(name, device)
    adapter = run.get("adapter")
    if adapter:
        lc = LoRAConfig.from_dict(run["lora"])
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pick_precision(device, tc.precision), torch.float32)
        attach_lora(model, lc, dtype, torch.Generator().manual_seed(tc.seed))  # the same seed, the same initial A
    tok, data, book_refs, texts = prepare_data(store, name, run["books"], tc.val_fraction)
    run.setdefault("book_refs", book_refs)
    run["params"] = count_params(model)
    out_dir = store.adapter_dir(name, adapter, must_exist=False) if adapter else store.model_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_len = torch.from_numpy(tok.byte_lengths())
    sample = None
    if tc.sample_tokens:
        sample = sampler(tok, tc.sample_prompt or first_line(texts[0]), tc, device)
    return Trainer(model, data, byte_len, tc, run_dir(store, name, adapter), out_dir / "metrics.jsonl", run, sample)


def sampler(tok, prompt, tc, device):
    """What the trainer calls at each evaluation: the model's continuation of `prompt`, always
    with the run's seed, so one run's samples differ only by what the model has learned."""
    sc = SamplingConfig(max_new_tokens=tc.sample_tokens, seed=tc.seed)

    def sample(model):
        # one CPU thread: decoding is a chain of small matrix-vector products, where threads
        # mostly wait for each other (as in server.py); training gets its threads back after
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {"prompt": prompt, "text": generate(model, tok, prompt, sc, device)}
        finally:
            torch.set_num_threads(threads)
    return sample


def first_line(text, max_chars=80):
    """The first non-empty line of a book, cut at a word before max_chars: a prompt in its style."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= max_chars else line[:max_chars].rsplit(" ", 1)[0]


def run_and_record(store, name, trainer, on_event, should_stop):
    """Run the trainer; its result goes into the store before run.json says the run is over."""
    summary = trainer.run(on_event, should_stop, on_finish=lambda status: record(store, name, trainer, status))
    run = trainer.run_info
    best = store.lineage(name)["best_val_bpb"] if not run.get("adapter") else (trainer.run_best or [None])[0]
    return {**summary, "params": run["params"], "adapter": run.get("adapter"), "best_val_bpb": best}


def prepare_data(store, name, books, val_fraction=0.1):
    """Books -> (tokenizer, {train, val} token arrays, [{name, sha256}], [text of each book]). The
    first run of a model trains its tokenizer on its books; later runs reuse it."""
    if not books:
        raise StoreError("give at least one book to train on")
    resolved = [store.resolve_book(b) for b in books]
    texts = {f"{n}-{sha[:8]}": text for n, text, sha in resolved}
    tok = store.tokenizer(name) or train_tokenizer(store, name, texts.values())
    data = prepare_tokens(tok, texts, store.home / "cache" / "tokens", val_fraction)
    return tok, data, [{"name": n, "sha256": sha} for n, _, sha in resolved], [text for _, text, _ in resolved]


def train_tokenizer(store, name, texts):
    """Learn the model's BPE on `texts` (vocab_size from its config) and save it with the model."""
    tok = Tokenizer.train(texts, store.config(name).vocab_size)
    tok.save(store.model_dir(name) / "tokenizer.json")
    return tok


def record(store, name, trainer, status):
    """Save a run's result into the store: the weights and the run in the lineage, a version
    when it finished — or, for a fine-tune, the adapter (also when stopped: it is usable)."""
    run = trainer.run_info
    entry = {"run_id": run["run_id"], "books": run["book_refs"], "steps": trainer.step, "status": status,
             "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "best": trainer.run_best}
    best = trainer.run_best[0] if trainer.run_best else None
    if run.get("adapter"):
        store.save_adapter(name, run["adapter"], trainer.model, LoRAConfig.from_dict(run["lora"]), run["base_sha256"],
                           {**entry, "best_val_bpb": best})
        return
    store.save_weights(name, trainer.model)
    lin = store.lineage(name)
    runs = [r for r in lin["runs"] if r["run_id"] != run["run_id"]]
    runs.append({**entry, "selfplay_every": trainer.tc.selfplay_every, "config": run["config"]})
    olds = [b for b in (lin["best_val_bpb"], best) if b is not None]
    store.update_lineage(name, runs=runs, books=merge_books(lin["books"], run["book_refs"]),
                         best_val_bpb=min(olds) if olds else None, steps=run["base_steps"] + trainer.step)
    if status == "done":
        store.save_version(name, note=f"run {run['run_id']}: {trainer.step} steps")


# ----------------------------------------------------------------------------- evaluation


def evaluate_on_book(store, model, tok, book, windows, device):
    """Loss and bits/byte of `model` on the validation split of `book`, cut with its tokenizer;
    also the unigram baseline and the split's size."""
    name, text, _ = store.resolve_book(book)
    data = prepare_tokens(tok, {name: text}, store.home / "cache" / "tokens")
    T = min(model.config.max_seq_len, len(data["val"]) - 1)
    if T < 8:
        raise StoreError(f"book {book!r} is too short to score: its validation split has {len(data['val'])} tokens")
    byte_len = torch.from_numpy(tok.byte_lengths())
    out = evaluate_bpb(model, data["val"], byte_len, T, windows, device)
    return {**out, "unigram_bpb": round(unigram_bpb(data, byte_len), 5), "val_tokens": len(data["val"])}
