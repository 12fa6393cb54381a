"""Several processes (`python -m bench ddp`): the same training, one global batch and the same
steps, as one process (`python cli.py train`) and as N ranks (`torchrun ... cli.py train`), in
alternating rounds: the global tokens/s of each, the speed-up over one process and the scaling
efficiency (speed-up / N). On a GPU machine: `--device cuda --procs 1,8`."""

import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from hardware import pick_device
from model import PRESETS
from app.store import Store
from bench.common import EXAMPLE_BOOK, ROOT, SHAKESPEARE, TINY, _pct, _table, load_average, log, machine_info
from bench.speed import SHAPES


def run_ddp(args):
    """Global tokens/s of one training on 1 and N processes: the same global batch, split evenly
    over the ranks, so every run computes the same steps (strong scaling). Each run is the CLI as
    a user starts it, in a fresh process; tokens/s is the median over its steps after the first 3."""
    procs = [int(n) for n in args.procs.split(",")]
    presets = {"quick": TINY} if args.quick else {k: PRESETS[k] for k in args.presets.split(",")}
    steps, rounds = (6, 1) if args.quick else (args.steps or 20, 2)
    book = EXAMPLE_BOOK if args.quick or not SHAKESPEARE.exists() else SHAKESPEARE
    result = {"meta": machine_info(pick_device(args.device), args, book, None), "rows": []}
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.books.add("book", book.read_bytes(), book.name)
        for preset, cfg in presets.items():
            B, T = (4, 32) if args.quick else SHAPES[preset]
            global_batch = args.global_batch or 2 * B
            speeds, tok = collections.defaultdict(list), None
            for r in range(rounds):
                for n in procs if r % 2 == 0 else procs[::-1]:  # alternating: slow drifts in load hit both
                    name = f"{preset}-{n}-{r}"
                    store.create_model(name, cfg, tokenizer=tok)
                    run = ddp_run(store, name, n, global_batch, T, steps, args)
                    tok = store.tokenizer(name)  # trained by the first run, reused by the others
                    speeds[n].append(run["tok_s"])
                    log({"preset": preset, "procs": n, **run})
            base = statistics.median(speeds[procs[0]])
            for n in procs:
                tok_s = statistics.median(speeds[n])
                result["rows"].append({"preset": preset, "procs": n, "batch_per_rank": global_batch // n,
                                       "global_batch": global_batch, "seq_len": T, "precision": run["precision"],
                                       "tok_s": tok_s, "speedup": tok_s / base, "efficiency": tok_s / base / (n / procs[0])})
    result["meta"]["loadavg_end"] = load_average()
    return result


def ddp_run(store, name, n, global_batch, T, steps, args):
    """One `cli.py train` on n processes (plain python for one) -> {tok_s, precision, wall_s}."""
    if global_batch % n:
        raise SystemExit(f"--global-batch {global_batch} does not split evenly over {n} processes")
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    flags = ["--steps", steps, "--batch-size", global_batch // n, "--seq-len", T, "--device", args.device,
             "--compile", args.compile or "off", "--eval-every", 10**6, "--checkpoint-every", 10**6]
    cmd = [sys.executable, *launch, "cli.py", "--home", store.home, "train", name, "--book", "book", *flags]
    t0 = time.perf_counter()
    out = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    rows = store.metrics(name)[3:]
    return {"tok_s": statistics.median(r["tokens_per_s"] for r in rows), "wall_s": round(time.perf_counter() - t0, 1),
            "precision": json.loads(out.stdout.splitlines()[-1])["precision"]}


def format_ddp(r):
    m = r["meta"]
    lines = [f"{m['date']}  {m['cpu']}, {os.cpu_count()} cores, device {m['device']}, torch {m['torch']}, "
             f"load {m['loadavg_start']} -> {m.get('loadavg_end')}", f"command: {m['command']}", ""]
    return "\n".join(lines + _table(
        ["preset", "processes", "batch per rank", "global batch x T", "precision", "tok/s", "speed-up", "efficiency"],
        [[x["preset"], x["procs"], x["batch_per_rank"], f"{x['global_batch']} x {x['seq_len']}", x["precision"],
          x["tok_s"], x["speedup"], _pct(x["efficiency"])] for x in r["rows"]]))
