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

On several processes (torchrun, distributed.py) every rank builds the same run; rank 0 alone
deletes and writes, and prepares the data before the others read it (lines marked `# DDP:`).

A run holds its model's lease (store.training) from the first step to the record, so a second
run of the model — from this server or a CLI in another terminal — is refused, not interleaved.
Everything a run needs (books, their length, config, memory) is checked before anything is
written, and a new run replaces the last run's run.json and checkpoints only once its own first
step is done (checkpoint.RunFolder.claim): a start that fails leaves a stopped run resumable at its step.
Resume continues on the data the run started with: run.json keeps each book's sha256, and a book
whose text changed since is refused unless the user says to go on with the new text
(`changed_data`), which the run and the lineage then record.
"""

import contextlib
import threading
import time
from collections import Counter

import torch

import distributed
from app.records import BookRef, Run, merge_books, new_run
from azr_trainer import TrainConfig, Trainer
from evaluate import evaluate_bpb, unigram_bpb
from files import CorruptFile, Exists, NotFound, StoreError
from generate import SamplingConfig, generate
from hardware import DTYPES, pick_precision
from lora import LoRAConfig, attach_lora, count_params
from model import GPT
from sizing import check_training_memory, window_len
from speed import cache_compiles_in, compile_choice, seconds_per_step
from app.names import check_name
from tokenizer import Tokenizer, prepare_tokens


def train(store, name, books, tc, on_event=None, should_stop=None, allow_paths=False):
    """Start a new run of `tc.steps` steps on `books` (store names; with allow_paths, the CLI's
    paths too). -> a summary."""
    with lease(store, name):
        check_fits(store, name, tc)
        run = new_run(books, tc, base_steps=store.lineage(name)["steps"], book_paths=allow_paths)
        run = distributed.broadcast(run)  # DDP: one run id
        return run_and_record(store, name, make_trainer(store, name, run), on_event, should_stop)


def finetune(store, name, books, tc, adapter, lc=None, on_event=None, should_stop=None, allow_paths=False):
    """LoRA fine-tuning (lora.py) of model `name` on `books`: the base stays frozen, in NF4 if
    lc.nf4 (QLoRA), and reuses its tokenizer; only the adapter trains. The run saves
    models/<name>/adapters/<adapter>/ and leaves the base model untouched. -> a summary."""
    lc = (lc or LoRAConfig()).validate()
    check_name(adapter, "adapter")
    with lease(store, name):
        check_fits(store, name, tc)
        if store.tokenizer(name) is None:
            raise StoreError(f"model {name!r} has no tokenizer yet: train it on a book before fine-tuning it")
        if adapter in store.adapters.list(name):
            raise Exists(f"model {name!r} already has an adapter {adapter!r}; resume it or pick another name")
        if tc.selfplay_every:
            raise StoreError("self-play is not available for LoRA fine-tuning; set selfplay_every to 0")
        run = new_run(books, tc, adapter=adapter, lora=lc.to_dict(), base_sha256=store.weights_sha256(name),
                      book_paths=allow_paths)
        run = distributed.broadcast(run)  # DDP: one run id
        return run_and_record(store, name, make_trainer(store, name, run), on_event, should_stop)


def resume(store, name, on_event=None, should_stop=None, adapter=None, changed_data=False):
    """Continue the last unfinished run of `name` (or of its adapter) from its newest good
    checkpoint, on the books it started with (changed_data: on the books as they are now)."""
    with lease(store, name):
        run = load_run(store, name, adapter, changed_data)
        check_fits(store, name, TrainConfig.from_dict(run.config))
        trainer = make_trainer(store, name, run)
        restored = trainer.restore_latest()
        if restored["skipped"] and on_event:  # say why steps are redone: the newest checkpoint was bad
            on_event({"type": "warning", "message": f"skipped damaged checkpoints ({'; '.join(restored['skipped'])}); "
                                                    f"resuming from {restored['path']} (step {restored['step']})"})
        if restored["note"] and on_event:  # resumed on another number of processes
            on_event({"type": "warning", "message": restored["note"]})
        return run_and_record(store, name, trainer, on_event, should_stop)


def lease(store, name):
    """The model's training lease, held by rank 0 for all ranks of a run (DDP)."""
    return store.training(name) if distributed.is_main() else contextlib.nullcontext()


# GPT-3's largest batch was 3.2 M tokens (Brown et al. 2020, Table 2.1); a bigger step here is a
# typo, and it would take hours on a CPU before Stop or a first number could show
MAX_TOKENS_PER_STEP = 2**22


def check_fits(store, name, tc):
    """Refuse, before anything is allocated, a run that model `name` or this machine cannot take:
    windows longer than the model's context, a step of more than MAX_TOKENS_PER_STEP tokens
    (grad_accum micro-batches count), or a step that needs more memory than there is."""
    tc.validate()
    cfg = store.config(name)
    device = distributed.device_for_rank(tc.device)
    check_training_memory(cfg, tc.batch_size, window_len(tc, cfg), pick_precision(device, tc.precision), device,
                          tc.optimizer)
    tokens = tc.batch_size * tc.grad_accum * window_len(tc, cfg)
    if tokens > MAX_TOKENS_PER_STEP:
        raise StoreError(f"one step of batch_size {tc.batch_size} x grad_accum {tc.grad_accum} x seq_len "
                         f"{window_len(tc, cfg)} is {tokens:,} tokens, more than the {MAX_TOKENS_PER_STEP:,} a step may "
                         f"take; lower batch_size or grad_accum")


def step_time(store, name, tc):
    """-> {seconds_per_step, precision, device, compile, compile_reason}: a probe of one eager
    training step of a fresh model with `name`'s config, on this machine, at tc's batch, window and
    precision, and whether the run would compile. Cached per config and machine setting: the page
    asks again at every keystroke."""
    check_fits(store, name, tc)
    cfg, device = store.config(name), distributed.device_for_rank(tc.device)
    precision = pick_precision(device, tc.precision)
    T = window_len(tc, cfg)
    key = (tuple(cfg.to_dict().items()), tc.batch_size, T, tc.grad_accum, tc.optimizer, str(device), precision,
           torch.get_num_threads())
    with _PROBING:  # one probe at a time: two at once would time each other
        if key not in _STEP_TIMES:
            _STEP_TIMES[key] = seconds_per_step(GPT(cfg).to(device), tc, precision)
    on, reason = compile_choice(cfg, tc, T, device, precision, compile_probe_file(store))
    return {"seconds_per_step": _STEP_TIMES[key], "precision": precision, "device": str(device),
            "compile": on, "compile_reason": reason}


_STEP_TIMES, _PROBING = {}, threading.Lock()


def load_run(store, name, adapter=None, changed_data=False):
    """The run.json of the last run of `name` (or of its adapter), checked to be resumable."""
    path = run_dir(store, name, adapter) / "run.json"
    what = f"adapter {adapter!r} of {name!r}" if adapter else f"model {name!r}"
    try:
        run = Run.load(path)
    except NotFound:
        raise NotFound(f"{what} has no run to resume; start one with train or finetune") from None
    except CorruptFile as e:
        raise CorruptFile(f"{e}; {what} cannot resume this run: start a new one with train") from None
    if run.status == "done":
        raise StoreError(f"the last run of {what} finished; start a new one")
    if adapter and store.weights_sha256(name) != run.base_sha256:
        raise StoreError(f"model {name!r} has other weights than when adapter {adapter!r} started; it cannot resume")
    check_same_books(store, run, changed_data)
    return run


def check_same_books(store, run, changed_data):
    """A resumed run goes on with the text it started on. If a book changed since (deleted and
    uploaded again, edited), refuse — or, with changed_data, note in the run what changed at
    which step (record() puts it in the lineage) and let make_trainer take the books as they are."""
    then = run.book_refs
    if not then:
        return
    now = [_sha256_now(store, ref, run.book_paths) for ref in run.books]
    changed = [{"book": b, "sha256_then": r.sha256, "sha256_now": sha}
               for b, r, sha in zip(run.books, then, now) if r.sha256 != sha]
    if not changed:
        return
    if not changed_data:
        said = ", ".join(f"{c['book']!r} (sha256 {c['sha256_then'][:12]} then, {c['sha256_now'][:12]} now)" for c in changed)
        raise StoreError(f"the text of book {said} changed since this run started: resuming would go on "
                         f"training on other data. Start a new run, or resume on the changed data on purpose "
                         f"(`python cli.py resume --changed-data`, or \"changed_data\": true in /resume_training)")
    run.data_changed = (run.data_changed or []) + [{"step": run.step, "books": changed}]
    run.book_refs = None  # make_trainer takes the books' refs as they are now


def _sha256_now(store, ref, allow_path):
    try:
        return store.books.sha256(ref, allow_path)
    except NotFound as e:
        raise StoreError(f"a book of this run is gone ({e}); upload it again, or start a new run") from None


def run_dir(store, name, adapter=None):
    """Where a run keeps run.json and checkpoints; a fine-tune's sit under its base model's."""
    d = store.checkpoint_dir(name)
    return d / "adapters" / check_name(adapter, "adapter") if adapter else d


# ----------------------------------------------------------------------------- building a run


def make_trainer(store, name, run):
    """The Trainer for `run` on model `name`: its weights (+ a fresh LoRA adapter), its data."""
    tc = TrainConfig.from_dict(run.config)
    device = distributed.device_for_rank(tc.device)
    model = store.load_model(name, device)
    adapter = run.adapter
    if adapter:
        lc = LoRAConfig.from_dict(run.lora)
        dtype = DTYPES[pick_precision(device, tc.precision)]
        attach_lora(model, lc, dtype, torch.Generator().manual_seed(tc.seed))  # the same seed, the same initial A
    out_dir = store.adapters.dir(name, adapter, must_exist=False) if adapter else store.model_dir(name)
    with distributed.main_first():  # DDP: rank 0 writes the tokenizer and the token arrays, the others read them
        tok, data, book_refs, texts = prepare_data(store, name, run.books, tc.val_fraction, run.book_paths)
        if distributed.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
    if run.book_refs is None:
        run.book_refs = [BookRef(**ref) for ref in book_refs]
    elif [ref.model_dump() for ref in run.book_refs] != book_refs:  # a book changed after check_same_books looked
        raise StoreError("a book of this run changed while it was being resumed; resume again")
    run.params = count_params(model)
    cache_compiles_in(store.home / "cache" / "inductor")
    byte_len = torch.from_numpy(tok.byte_lengths())
    sample = None
    if tc.sample_tokens:
        sample = sampler(tok, tc.sample_prompt or first_line(texts[0]), tc, device)
    return Trainer(model, data, byte_len, tc, run_dir(store, name, adapter), out_dir / "metrics.jsonl", run, sample,
                   probe_file=compile_probe_file(store))


def compile_probe_file(store):
    """compile="auto"'s measurements, eager against compiled, per machine and config."""
    return store.home / "cache" / "compile_probe.json"


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
    best = store.lineage(name)["best_val_bpb"] if not run.adapter else (trainer.run_best or [None])[0]
    return {**summary, "params": run.params, "adapter": run.adapter, "best_val_bpb": best}


def prepare_data(store, name, books, val_fraction=0.1, allow_paths=False):
    """Books -> (tokenizer, {train, val} token arrays, [{name, sha256}], [text of each book]). The
    first run of a model trains its tokenizer on its books; later runs reuse it."""
    check_books(books)
    resolved = [store.books.resolve(b, allow_paths) for b in books]
    texts = {f"{n}-{sha[:8]}": text for n, text, sha in resolved}
    tok = store.tokenizer(name) or train_tokenizer(store, name, texts.values())
    data = prepare_tokens(tok, texts, store.home / "cache" / "tokens", val_fraction)
    return tok, data, [{"name": n, "sha256": sha} for n, _, sha in resolved], [text for _, text, _ in resolved]


def check_books(books):
    """At least one book, each named once: a run reads every book it is given into memory."""
    if not books:
        raise StoreError("give at least one book to train on")
    twice = sorted(b for b, n in Counter(books).items() if n > 1)
    if twice:
        raise StoreError(f"book {twice[0]!r} is named more than once; name each book once")


def train_tokenizer(store, name, texts):
    """Learn the model's BPE on `texts` (vocab_size from its config) and save it with the model."""
    tok = Tokenizer.train(texts, store.config(name).vocab_size)
    tok.save(store.model_dir(name) / "tokenizer.json")
    return tok


def record(store, name, trainer, status):
    """Save a run's result into the store: the weights and the run in the lineage, a version
    when it finished — or, for a fine-tune, the adapter (also when stopped: it is usable)."""
    run = trainer.run_info
    book_refs = [ref.model_dump() for ref in run.book_refs]
    entry = {"run_id": run.run_id, "books": book_refs, "steps": trainer.step, "status": status,
             "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "best": trainer.run_best, "world_size": run.world_size}
    if run.data_changed is not None:
        entry["data_changed"] = run.data_changed
    best = trainer.run_best[0] if trainer.run_best else None
    if run.adapter:
        store.adapters.save(name, run.adapter, trainer.model, LoRAConfig.from_dict(run.lora), run.base_sha256,
                           {**entry, "best_val_bpb": best})
        return
    with store.locked(name):  # read, change, write: no other update of the lineage in between
        store.save_weights(name, trainer.model)
        lin = store.lineage(name)
        runs = [r for r in lin["runs"] if r["run_id"] != run.run_id]
        runs.append({**entry, "selfplay_every": trainer.tc.selfplay_every, "config": run.config})
        olds = [b for b in (lin["best_val_bpb"], best) if b is not None]
        store.update_lineage(name, runs=runs, books=merge_books(lin["books"], book_refs),
                             best_val_bpb=min(olds) if olds else None, steps=run.base_steps + trainer.step)
        if status == "done":
            store.save_version(name, note=f"run {run.run_id}: {trainer.step} steps")


# ----------------------------------------------------------------------------- evaluation


def evaluate_on_book(store, model, tok, book, windows, device, allow_path=False):
    """Loss and bits/byte of `model` on the validation split of `book` (a store name; with
    allow_path, the CLI's path too), cut with its tokenizer; also the unigram baseline and the
    split's size."""
    name, text, _ = store.books.resolve(book, allow_path)
    data = prepare_tokens(tok, {name: text}, store.home / "cache" / "tokens")
    T = min(model.config.max_seq_len, len(data["val"]) - 1)
    if T < 8:
        raise StoreError(f"book {book!r} is too short to score: its validation split has {len(data['val'])} tokens")
    byte_len = torch.from_numpy(tok.byte_lengths())
    out = evaluate_bpb(model, data["val"], byte_len, T, windows, device)
    return {**out, "unigram_bpb": round(unigram_bpb(data, byte_len), 5), "val_tokens": len(data["val"])}
