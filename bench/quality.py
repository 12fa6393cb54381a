"""Quality per minute (`python -m bench quality --minutes 5`): the small preset trained for a
time budget on a book, scored in validation bits/byte; `--sweep` tries each of CANDIDATES, one
change from TrainConfig's defaults at a time. `--vs-nanogpt` runs vs_nanogpt.py instead."""

import collections
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from azr_trainer import TrainConfig
from evaluate import evaluate_bpb
from hardware import pick_device
from model import PRESETS
from app.store import Store
from bench.common import load_average, log, machine_info, make_trainer


# A sweep around TrainConfig's defaults: one change at a time, each trained for the same
# wall-clock budget.
CANDIDATES = [
    {},
    {"learning_rate": 1e-3}, {"learning_rate": 3e-3},
    {"batch_size": 4}, {"batch_size": 16},
    {"seq_len": 64},
    {"warmup_steps": 20}, {"warmup_steps": 100},
]


def run_quality(args):
    """Val bits/byte of the small preset after `minutes` of training on the book, per candidate.

    The budget becomes a number of steps, from the step time of a probe run. On a shared machine
    one probe can be 20% off, so candidates that only change lr or warm-up reuse the step count
    of the first probe of their batch shape: they do the same work per step."""
    device = pick_device(args.device)
    book = Path(args.book)
    base = dict(_parse_set(kv) for kv in args.set)
    candidates = [{**base, **c} for c in CANDIDATES] if args.sweep else [base]
    result = {"meta": machine_info(device, args, book, None), "minutes": args.minutes, "rows": []}
    budget = collections.defaultdict(lambda: args.steps) if args.steps else {}  # (batch, seq_len) -> steps
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.books.add("book", book.read_bytes(), book.name)
        for i, changes in enumerate(candidates):
            row = quality_run(store, f"q{i}", changes, args.minutes, device, budget)
            result["rows"].append(row)
            log(row)
    result["meta"]["loadavg_end"] = load_average()
    return result


def quality_run(store, name, changes, minutes, device, budget, probe_steps=210):
    """Unless `budget` has a step count for this batch shape: time steps 10..210 of a probe run
    (evaluations and checkpoints included, in the same proportion as in the real run) and set
    `steps` so that setup (tokenizer, compilation) plus training fill the time (the cosine
    schedule then ends on time). Train with every other default as a user gets it (evaluations,
    checkpoints, keep_best); measure bits/byte on the whole val split at the full context."""
    tc = TrainConfig(**{"device": str(device), **changes})
    t0 = time.perf_counter()
    probe = make_trainer(store, name + "-probe", PRESETS["small"], replace(tc, steps=10**6))
    probe.stepper.decide_compile(probe.tc, probe.step)  # compiles if needed
    setup_s = time.perf_counter() - t0  # an upper bound for the real run: it reuses the tokenizer
    try:
        steps = budget[tc.batch_size, probe.T]
    except KeyError:
        probe.tc = replace(probe.tc, steps=probe_steps)
        times = []
        probe.run(on_event=lambda e: e["type"] == "step" and times.append(time.perf_counter()))
        step_s = (times[-1] - times[9]) / (len(times) - 10)
        steps = budget[tc.batch_size, probe.T] = max(1, int((minutes * 60 - setup_s) / step_s))
    t0 = time.perf_counter()
    trainer = make_trainer(store, name, PRESETS["small"], replace(tc, steps=steps), tokenizer=store.tokenizer(name + "-probe"))
    trainer.run()
    wall_s = time.perf_counter() - t0
    T = trainer.cfg.max_seq_len
    val = evaluate_bpb(trainer.model, trainer.data["val"], trainer.byte_len, T, 10**9, trainer.device, trainer.precision)
    return {"changes": changes, "steps": steps, "tokens": steps * tc.batch_size * trainer.T, "wall_s": wall_s,
            "precision": trainer.precision, "compiled": trainer.stepper.compiled,
            "best_step": trainer.run_best[1] if trainer.run_best else None, **val}


def _parse_set(kv):
    key, _, value = kv.partition("=")
    kind = type(getattr(TrainConfig(), key))
    return key, kind(float(value)) if kind is int else kind(value)
