"""Where the time goes (`python -m bench profile`): torch.profiler's top ops for training steps and
for batch-1 generation, with the optimizer's share of a step, and a self-play step by parts."""

import tempfile
import time
from dataclasses import replace

import torch

from azr_trainer import TrainConfig
from generate import SamplingConfig, generate_ids
from hardware import autocast, pick_device
from model import GPT, PRESETS
from app.store import Store
from bench.common import EXAMPLE_BOOK, make_trainer, pick_precisions, timed
from bench.speed import SHAPES, trainer_step


def run_profile(args):
    """Where the time goes: torch.profiler's top ops for training steps of each preset, precision
    and optimizer (--presets, --precisions, --optimizers, --compile) with the optimizer's share of
    a step, and for batch-1 generation with the KV cache."""
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.books.add("book", EXAMPLE_BOOK.read_bytes(), EXAMPLE_BOOK.name)
        for name in args.presets.split(","):
            for prec in pick_precisions(device, args.precisions):
                for opt in args.optimizers.split(","):
                    profile_train(store, name, prec, opt, device, args.compile or "on")
                profile_selfplay(store, name, PRESETS[name], prec, device)
                model = GPT(replace(PRESETS[name], max_seq_len=256)).to(device)
                sc = SamplingConfig(max_new_tokens=200, seed=0)
                prompt = torch.zeros(1, 16, dtype=torch.long, device=device)
                with autocast(device, prec):
                    print(f"\n### generate {name} {prec}: 200 tokens, batch 1, KV cache")
                    print(top_ops(lambda: sum(1 for _ in generate_ids(model, prompt, sc))))


def profile_train(store, preset, prec, optimizer, device, compile_):
    """Top ops of 5 training steps, and the share of their time in the optimizer's step (torch.optim
    marks it as the profiler range "Optimizer.step#<class>.step")."""
    B, T = SHAPES[preset]
    tc = TrainConfig(batch_size=B, seq_len=T, precision=prec, device=str(device), compile=compile_, optimizer=optimizer)
    step = trainer_step(make_trainer(store, f"{preset}-{prec}-{optimizer}", PRESETS[preset], tc))
    step.trainer.stepper.decide_compile(step.trainer.tc, step.trainer.step)
    print(f"\n### train {preset} {prec} {optimizer}, compiled {step.trainer.stepper.compiled}, 5 steps of {B} x {T}")
    table, prof = top_ops(lambda: [step() for _ in range(5)], lambda: [step() for _ in range(3)], with_prof=True)
    print(table)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    step_s = (time.perf_counter() - t0) / 5
    opt_s = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step#")) / 5e6
    print(f"optimizer step: {opt_s * 1e3:.1f} ms of a {step_s * 1e3:.1f} ms step "
          f"({opt_s / step_s:.1%}; the step timed without the profiler)")


def profile_selfplay(store, preset, cfg, prec, device, warm=200, steps=10):
    """A self-play step by parts against a supervised step, on the user's path (TrainConfig's
    defaults but self-play on, eager): the model first trains `warm` steps on the book, so its
    rollouts loop the way a trained model's do, then `steps` of each kind, timed alternately.
    -> the medians in ms: supervised, self-play and the self-play step's parts."""
    tc = TrainConfig(selfplay_every=3, precision=prec, device=str(device), compile="off")
    step = trainer_step(make_trainer(store, f"{preset}-{prec}-selfplay", cfg, tc))
    for _ in range(warm):
        step()
    sp, parts = step.trainer.selfplay, {"roll out": [], "update": []}
    for part, name in (("roll out", "roll_out"), ("update", "_update")):
        setattr(sp, name, timed_part(getattr(sp, name), parts[part]))
    sup, whole = [], []
    for _ in range(steps):
        sup.append(timed(step))
        whole.append(timed(sp.step))
    parts["the rest (proposer, bookkeeping)"] = [w - r - u for w, r, u in zip(whole, *parts.values())]  # step by step
    ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in {"supervised": sup, "self-play": whole, **parts}.items()}  # medians
    c = sp.cfg
    print(f"\n### self-play step {preset} {prec}: {c.rollouts} rollouts of {sp.n} tokens after {sp.P}, "
          f"after {warm} supervised steps of {tc.batch_size} x {step.trainer.T}; medians of {steps}")
    print(f"supervised step {ms['supervised']:.1f} ms; self-play step {ms['self-play']:.1f} ms = "
          f"{ms['self-play'] / ms['supervised']:.2f} supervised steps: " + ", ".join(f"{k} {ms[k]:.1f} ms" for k in parts))
    print(top_ops(sp.step, rows=8))
    return ms


def timed_part(f, into):
    def part(*args):
        t = time.perf_counter()
        out = f(*args)
        into.append(time.perf_counter() - t)
        return out
    return part


def top_ops(f, warmup=None, rows=12, with_prof=False):
    (warmup or f)()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        f()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    return (table, prof) if with_prof else table
