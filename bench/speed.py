"""Benchmarks: our trainer against Hugging Face transformers on the same model, in the same run.

A speed number alone says little: CPUs differ, and so does the load on a shared machine from one
minute to the next. So every row here is a *ratio*: our code and a peer — HF `GPT2LMHeadModel`
with the identical configuration (sdpa attention, dropout 0, tied embeddings, torch AdamW with the
same hyperparameters, the same autocast) — run in alternating rounds (A B, B A, A B ...) in one
process, and we report the median of the per-round ratios. Slow drifts in load hit both sides.

What is measured (`python bench.py`, `--json` for machine-readable output):
- train tokens/s in steady state (after warm-up), for the small and medium presets, fp32 and bf16
  (bf16 only where the CPU/GPU has it natively, see hardware.py);
- MFU, model FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): flops_per_token * tokens/s
  over the peak of *this* machine, measured here with a large matmul in the same dtype;
- generation tokens/s at batch 1, 200 new tokens: with the KV cache, without it (the whole prefix
  re-run for each token), and the peer's `generate()` with the same sampling settings;
- matmul-only tokens/s: the time of a step's matmuls alone, at their shapes, the ceiling that
  says how much of a gap to the peer any trainer could open when both are matmul-bound;
- peak memory of one training step: tensors alive before it (weights, optimizer state) plus the
  high-water mark of allocations during it, read from the PyTorch profiler's allocator events —
  exact for tensors, blind to the Python interpreter and the allocator's free lists;
- NF4 (quant.py): bits per parameter, quantize and dequantize speed.

`python bench.py quality --minutes 5` trains the small preset on tinyshakespeare for a time
budget and reports validation bits/byte: quality per minute, the number the defaults are tuned on.
`python bench.py quality --vs-nanogpt --minutes 3,5,15` does it on nanoGPT's split, beside
nanoGPT's CPU recipe as the peer (benchmarks/vs_nanogpt.py).

`python bench.py ddp` runs the same training — one global batch, the same steps — as one process
(`python cli.py train`) and as N ranks (`torchrun --standalone --nproc_per_node N cli.py train`),
in alternating rounds, and reports the global tokens/s of each, the speed-up over one process
and the scaling efficiency (speed-up / N). On a GPU machine: `--device cuda --procs 1,8`.

`python bench.py views` times each look-inside view of the web page (/inside/...) the way the page
asks for it, through HTTP, on small-preset models trained for a few steps; and the sample the
trainer writes at each evaluation.
"""

import argparse
import collections
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

import quant
import runs
from azr_trainer import TrainConfig, evaluate_bpb, new_run
from generate import SamplingConfig, generate_ids, sample_next
from hardware import autocast, pick_device, pick_precision
from model import PRESETS, GPT, ModelConfig
from sizing import flops_per_token, memory_estimate
from store import Store

ROOT = Path(__file__).resolve().parent
BOOKS = ROOT.parent / "shared" / "books"  # public-domain books for benchmarks, never committed here
SHAKESPEARE = BOOKS / "tinyshakespeare.txt"
EXAMPLE_BOOK = ROOT / "books" / "example_book.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (batch, seq_len) of the train rows: the shapes the peer numbers were taken at
SHAPES = {"tiny": (16, 128), "small": (16, 128), "medium": (8, 256), "large": (4, 512)}
TINY = ModelConfig(512, 32, 2, 2, 64, 32)  # --quick: the test suite's tiny model
FULL = dict(rounds=7, steps_per_round=4, warmup_steps=4, new_tokens=200, gen_rounds=3, matmul_n=2048)
QUICK = dict(rounds=2, steps_per_round=1, warmup_steps=1, new_tokens=8, gen_rounds=1, matmul_n=256)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["selfplay"]:  # the self-play A/B has its own options
        from benchmarks import selfplay_ab
        return selfplay_ab.main(argv[1:])
    if argv[:1] == ["quality"] and "--vs-nanogpt" in argv:  # nanoGPT's split and CPU recipe as the peer
        from benchmarks import vs_nanogpt
        return vs_nanogpt.main([a for a in argv[1:] if a != "--vs-nanogpt"])
    if argv[:1] == ["llamacpp"]:  # llama.cpp on our GGUF export, with its own options
        from benchmarks import llamacpp
        return llamacpp.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="speed",
                   choices=["speed", "quality", "profile", "lora", "ddp", "views", "selfplay", "llamacpp"],
                   help="selfplay: the self-play A/B, see `python bench.py selfplay --help`; llamacpp: "
                        "llama.cpp on our GGUF export, see `python bench.py llamacpp --help`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quick", action="store_true", help="tiny model, a few seconds: a smoke test")
    p.add_argument("--presets", default="small,medium")
    p.add_argument("--optimizers", default=TrainConfig.optimizer, help="profile: comma list of TrainConfig optimizers")
    p.add_argument("--precisions", default="auto", help="comma list, or auto: fp32 plus bf16 where native")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers even when installed")
    p.add_argument("--generate-only", action="store_true", help="speed: only the generation rows")
    p.add_argument("--rounds", type=int, help="speed: alternating rounds of training and of generation (default "
                                              f"{FULL['rounds']} and {FULL['gen_rounds']}); 1 for a quick look at large")
    p.add_argument("--compile", choices=["on", "off", "auto"],
                   help="our trainer's torch.compile setting; on (default, off with --quick) also times it "
                        "without, as 'eager'")
    p.add_argument("--minutes", type=float, default=5.0, help="quality: training time budget")
    p.add_argument("--book", default=str(SHAKESPEARE), help="quality: the book to train and validate on")
    p.add_argument("--sweep", action="store_true", help="quality: try each candidate in CANDIDATES")
    p.add_argument("--steps", type=int, help="quality: train exactly this many steps instead of filling --minutes; "
                                            "ddp: steps per run (default 20)")
    p.add_argument("--procs", default="1,2", help="ddp: numbers of processes to compare (the first is the baseline)")
    p.add_argument("--global-batch", type=int, help="ddp: windows per optimizer step over all processes "
                                                     "(default: twice the preset's batch of the speed mode)")
    p.add_argument("--calls", type=int, default=10, help="views: warm requests per view")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="quality: a TrainConfig change, e.g. --set learning_rate=3e-3 (repeatable)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "profile":
        return run_profile(args)
    if args.mode == "lora":
        return run_lora(args)
    if args.mode == "ddp":
        result = run_ddp(args)
        print(json.dumps(result, indent=1) if args.json else format_ddp(result))
        return result
    if args.mode == "quality":
        result = run_quality(args)
    elif args.mode == "views":
        result = run_views(args)
    else:
        result = run_speed(args)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return result


# ----------------------------------------------------------------------------- speed


def run_speed(args):
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = {**sizes, "rounds": args.rounds, "gen_rounds": args.rounds}
    device = pick_device(args.device)
    precisions = pick_precisions(device, args.precisions)
    peer = None if args.no_peer else load_peer()
    presets = {"quick": TINY} if args.quick else {k: PRESETS[k] for k in args.presets.split(",")}
    book = EXAMPLE_BOOK if args.quick or not SHAKESPEARE.exists() else SHAKESPEARE
    result = {"meta": machine_info(device, args, book, peer), "peak_gflops": {}, "train": [], "generate": [], "nf4": None}
    for prec in precisions:
        result["peak_gflops"][prec] = matmul_peak(DTYPES[prec], device, sizes["matmul_n"])
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.add_book("book", book.read_bytes(), book.name)
        for name, cfg in presets.items():
            B, T = (4, 32) if args.quick else SHAPES[name]
            for prec in precisions:
                compile_ = args.compile or ("off" if args.quick else "on")
                tc = TrainConfig(batch_size=B, seq_len=T, precision=prec, device=str(device), compile=compile_)
                if not args.generate_only:
                    result["train"].append(train_row(store, name, cfg, tc, peer, sizes))
                    log(result["train"][-1])
                result["generate"].append(generate_row(name, cfg, device, prec, peer, sizes))
                log(result["generate"][-1])
    for prec in precisions:  # the peak is the best the machine did: measure again, keep the max
        result["peak_gflops"][prec] = max(result["peak_gflops"][prec], matmul_peak(DTYPES[prec], device, sizes["matmul_n"]))
    for row in result["train"]:
        for k in ("ours", "eager", "peer"):
            if row.get(f"{k}_tok_s"):
                row[f"{k}_mfu"] = row[f"{k}_tok_s"] * row["flops_per_token"] / 1e9 / result["peak_gflops"][row["precision"]]
    if not args.generate_only:
        result["nf4"] = nf4_row(PRESETS["medium"] if not args.quick else TINY, device)
    result["meta"]["loadavg_end"] = load_average()
    return result


def pick_precisions(device, requested):
    if requested != "auto":
        return requested.split(",")
    # emulated bf16 is 10-50x slower than fp32 (hardware.py): measuring it would only say that
    return ["fp32"] + (["bf16"] if pick_precision(device) == "bf16" else [])


def make_trainer(store, name, cfg, tc, tokenizer=None):
    """A real Trainer on the book, exactly as train() builds one: the benchmark times the code
    users run (batches from the memmap, autocast, clipping, the optimizer), not a copy of it."""
    store.create_model(name, cfg, tokenizer=tokenizer)
    return runs.make_trainer(store, name, new_run(["book"], tc))


def train_row(store, preset, cfg, tc, peer, sizes):
    """Steady-state train tokens/s in alternating rounds of: our trainer as configured ("ours"),
    our trainer without torch.compile ("eager", when ours compiles) and the peer."""
    contestants, setup_s, tok = {}, {}, None
    for k, compile_ in [("eager", "off")] * (tc.compile == "on") + [("ours", tc.compile)]:
        t0 = time.perf_counter()
        name = f"{preset}-{tc.precision}-{k}"
        trainer = make_trainer(store, name, cfg, replace(tc, compile=compile_), tok)
        trainer.decide_compile()
        tok = store.tokenizer(name)
        setup_s[k] = time.perf_counter() - t0  # token arrays and, for "ours", compilation
        contestants[k] = trainer_step(trainer)
    if peer:
        contestants["peer"] = peer_train_step(peer, trainer)
    for step in contestants.values():
        for _ in range(sizes["warmup_steps"]):
            step()
    n = sizes["steps_per_round"]
    times = interleave({k: (lambda f=f: [f() for _ in range(n)]) for k, f in contestants.items()}, sizes["rounds"])
    tokens = n * tc.batch_size * trainer.T
    rate = {k: [tokens / t for t in ts] for k, ts in times.items()}
    row = {"preset": preset, "precision": trainer.precision, "batch": tc.batch_size, "seq_len": trainer.T,
           "params": sum(p.numel() for p in trainer.model.parameters()), "flops_per_token": flops_per_token(cfg, trainer.T),
           "estimate_mb": memory_estimate(cfg, tc.batch_size, trainer.T, 2 if trainer.precision != "fp32" else 4,
                                          compiled=contestants["ours"].trainer.compiled)["total"] / 2**20,
           "ours_compiled": contestants["ours"].trainer.compiled,
           "matmul_only_tok_s": matmul_only_tok_s(cfg, tc.batch_size, trainer.T, DTYPES[trainer.precision], trainer.device)}
    for k, step in contestants.items():
        row[f"{k}_tok_s"] = statistics.median(rate[k])
        row[f"{k}_peak_mb"] = step_peak_bytes(step, step.model, step.optimizer) / 2**20
        if k != "peer":
            row[f"{k}_setup_s"] = setup_s[k]
    if peer:
        row["peer_params"] = sum(p.numel() for p in contestants["peer"].model.parameters())
        row["matmul_only_ratio"] = row["matmul_only_tok_s"] / row["peer_tok_s"]
        for k in contestants:
            if k != "peer":  # the median of per-round ratios: each pair ran under the same load
                row[f"{k}_ratio"] = statistics.median(a / b for a, b in zip(rate[k], rate["peer"]))
    return row


def trainer_step(trainer):
    def step():
        trainer.train_step()
        trainer.step += 1

    step.trainer, step.model, step.optimizer = trainer, trainer.model, trainer.optimizer
    return step


def peer_train_step(peer, trainer):
    """The loop a user of transformers would write: same batches, autocast, clipping, AdamW."""
    model = peer["model"](trainer.cfg).to(trainer.device)
    optimizer = peer_optimizer(model, trainer.tc)

    def step():
        x, _ = trainer.get_batch("train")
        with autocast(trainer.device, trainer.precision):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a progress bar would read, as our train_step does

    step.model, step.optimizer = model, optimizer
    return step


def peer_optimizer(model, tc):
    """torch's AdamW as a user gets it (default implementation), with our groups and settings."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def generate_row(preset, cfg, device, precision, peer, sizes):
    """Batch-1 sampling speed of 200 new tokens after a 16-token prompt. A preset whose context
    is shorter than that gets a longer position table here (both models): only wpe grows."""
    n = sizes["new_tokens"]
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, 16 + n))
    torch.manual_seed(0)
    ours = GPT(cfg).to(device).eval()
    prompt = torch.randint(cfg.vocab_size, (1, 16), device=device)
    sc = SamplingConfig(max_new_tokens=n, seed=0)  # SamplingConfig's defaults: T 0.8, top-k 50, top-p 0.95
    runs = {"cache": lambda: sum(1 for _ in generate_ids(ours, prompt, sc)),
            "no_cache": lambda: generate_without_cache(ours, prompt, sc)}
    if peer:
        model = peer["model"](cfg).to(device).eval()
        runs["peer"] = lambda: peer["generate"](model, prompt, sc)
    with autocast(device, precision):
        for f in runs.values():
            f()  # warm-up
        times = interleave(runs, sizes["gen_rounds"])
    rate = {k: [n / t for t in ts] for k, ts in times.items()}
    row = {"preset": preset, "precision": precision, "new_tokens": n,
           "ours_cache_tok_s": statistics.median(rate["cache"]), "ours_no_cache_tok_s": statistics.median(rate["no_cache"]),
           "peer_tok_s": None, "ratio": None}
    if peer:
        row.update(peer_tok_s=statistics.median(rate["peer"]),
                   ratio=statistics.median(a / b for a, b in zip(rate["cache"], rate["peer"])))
    return row


@torch.no_grad()
def generate_without_cache(model, idx, sc):
    """nanoGPT's generate: the whole sequence goes through the model again for every new token."""
    gen = torch.Generator(device=idx.device).manual_seed(sc.seed)
    for _ in range(sc.max_new_tokens):
        logits, _ = model(idx)
        nxt = sample_next(logits[:, -1, :], sc, idx, gen)  # (1, 1)
        logits[0, -1].float().softmax(-1)  # the token view's probabilities, as generate_ids yields
        idx = torch.cat([idx, nxt], dim=1)
    return idx


# ----------------------------------------------------------------------------- measuring


def interleave(fns, rounds):
    """Run every fn once per round, alternating the order (A B, B A, ...) -> {name: [seconds]}."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(timed(fns[k]))
    return times


def timed(f):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def matmul_only_tok_s(cfg, B, T, dtype, device, reps=5):
    """Train tokens/s of a step that did nothing but its matmuls (step_matmuls), each timed alone
    (best of `reps`, warm caches) at its real shape and dtype. The ceiling of a trainer that runs
    these matmuls at these shapes (the peer does): everything else in its step, elementwise
    work, optimizer, Python, would have to cost nothing. Ours splits the output layer's matmuls
    into chunks (model.HeadLoss), which can run faster than this."""
    seconds = 0.0
    for (b, m, k, n), count in step_matmuls(cfg, B, T).items():
        x, w = torch.randn(b, m, k, device=device).to(dtype), torch.randn(b, k, n, device=device).to(dtype)
        x, w = (x[0], w[0]) if b == 1 else (x, w)  # mm, as a Linear calls it, or bmm
        x @ w  # warm-up
        seconds += count * min(timed(lambda: x @ w) for _ in range(reps))
    return B * T / seconds


def step_matmuls(cfg, B, T):
    """{(batch, m, k, n): count}, the matmuls of one training step of B x T tokens: per Linear
    the forward x W^T and the gradients g W and x^T g; per attention six batched products of
    (T x hs) and (T x T) matrices, two forward, four backward."""
    M, C, nh = B * T, cfg.d_model, cfg.num_heads
    shapes = collections.Counter()
    for k_in, n_out in [(C, 3 * C), (C, C), (C, cfg.d_ff), (cfg.d_ff, C)] * cfg.num_layers + [(C, cfg.vocab_size)]:
        shapes[1, M, k_in, n_out] += 1  # x @ W^T
        shapes[1, M, n_out, k_in] += 1  # dx = g @ W
        shapes[1, k_in, M, n_out] += 1  # dW^T = x^T @ g
    shapes[B * nh, T, C // nh, T] += 3 * cfg.num_layers  # q k^T, and the gradients dp v^T, ds k
    shapes[B * nh, T, T, C // nh] += 3 * cfg.num_layers  # p v, and p^T dy, ds^T q
    return shapes


def matmul_peak(dtype, device, n=2048, reps=8):
    """GFLOP/s of the best of `reps` (n, n) x (n, n) matmuls: 2 n^3 FLOPs each."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: the first call picks kernels and faults in pages
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(reps)) / 1e9


def step_peak_bytes(step, model, optimizer):
    """Peak tensor memory of one training step, in bytes.

    Weights and optimizer state are alive before the step; on top of them the step allocates
    activations, gradients and temporaries. On CUDA the allocator keeps the high-water mark; on
    CPU we replay the profiler's allocation events ([memory]: +bytes, -bytes) in time order."""
    before = sum(t.numel() * t.element_size() for t in _tensors(model, optimizer))
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return before + torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before + peak


def _tensors(model, optimizer):
    seen = {id(p): p for p in model.parameters()}  # tied weights once
    for state in optimizer.state.values():
        seen.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return seen.values()


def nf4_row(cfg, device):
    """Bits per parameter of the medium model's Linear layers in NF4, and the speed of quantizing
    and dequantizing all of them (millions of parameters per second)."""
    torch.manual_seed(0)
    weights = [m.weight.detach().to(device) for n, m in GPT(cfg).named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    n = sum(w.numel() for w in weights)
    quantized = [quant.quantize_nf4(w) for w in weights]  # warm-up
    q_s = min(timed(lambda: [quant.quantize_nf4(w) for w in weights]) for _ in range(3))
    dq_s = min(timed(lambda: [quant.dequantize_nf4(q, w.shape) for q, w in zip(quantized, weights)]) for _ in range(3))
    stored = sum(quant.tensor_bytes(q.values()) for q in quantized)
    return {"params": n, "bits_per_param": 8 * stored / n, "quantize_mparams_s": n / q_s / 1e6,
            "dequantize_mparams_s": n / dq_s / 1e6}


def run_profile(args):
    """Where the time goes: torch.profiler's top ops for training steps of each preset, precision
    and optimizer (--presets, --precisions, --optimizers, --compile) with the optimizer's share of
    a step, and for batch-1 generation with the KV cache."""
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        store.add_book("book", EXAMPLE_BOOK.read_bytes(), EXAMPLE_BOOK.name)
        for name in args.presets.split(","):
            for prec in pick_precisions(device, args.precisions):
                for opt in args.optimizers.split(","):
                    profile_train(store, name, prec, opt, device, args.compile or "on")
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
    step.trainer.decide_compile()
    print(f"\n### train {preset} {prec} {optimizer}, compiled {step.trainer.compiled}, 5 steps of {B} x {T}")
    table, prof = top_ops(lambda: [step() for _ in range(5)], lambda: [step() for _ in range(3)], with_prof=True)
    print(table)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    step_s = (time.perf_counter() - t0) / 5
    opt_s = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step#")) / 5e6
    print(f"optimizer step: {opt_s * 1e3:.1f} ms of a {step_s * 1e3:.1f} ms step "
          f"({opt_s / step_s:.1%}; the step timed without the profiler)")


def top_ops(f, warmup=None, rows=12, with_prof=False):
    (warmup or f)()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        f()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    return (table, prof) if with_prof else table


# ----------------------------------------------------------------------------- NF4 and LoRA


def run_lora(args):
    """NF4 on a random matrix, then a base trained on one book fine-tuned on another three
    ways (QLoRA, LoRA, full): val bits/byte on the new book, speed, memory. JSON on stdout."""
    device = pick_device(args.device)
    print(json.dumps({"matrix": nf4_matrix(device=device)}, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as home:
        result = lora_finetune(Store(home), str(BOOKS / "pride_and_prejudice.txt"), str(SHAKESPEARE), "small",
                               300, 150, str(device))
    print(json.dumps({"finetune": result, "threads": torch.get_num_threads()}, indent=1))


def nf4_matrix(n=4096, device="cpu"):
    """NF4 on a random N(0, 0.02^2) n x n matrix: bits, bytes, error and speed."""
    w = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    q, quantize_s = timed_result(lambda: quant.quantize_nf4(w))
    _, dequantize_s = timed_result(lambda: quant.dequantize_nf4(q, w.shape))
    plain = quant.quantize_nf4(w, double_quant=False)
    return {"shape": [n, n], "device": str(device), "bits_per_param": 8 * quant.tensor_bytes(q.values()) / w.numel(),
            "bytes_fp32": quant.tensor_bytes([w]), "bytes_nf4": quant.tensor_bytes(q.values()),
            **quant.quantization_error(w, q), "quantize_s": quantize_s, "dequantize_s": dequantize_s,
            "without_double_quant": {"bits_per_param": 8 * quant.tensor_bytes(plain.values()) / w.numel(),
                                     **quant.quantization_error(w, plain)}}


def lora_finetune(store, base_book, new_book, preset, base_steps, ft_steps, device):
    """Train a base on one book, then fine-tune it on another three ways (QLoRA, LoRA, full),
    with the same steps, batch and learning rate."""
    from lora import LoRAConfig, merge_lora
    store.create_model("base", PRESETS[preset])
    runs.train(store, "base", [base_book], TrainConfig(steps=base_steps, eval_every=base_steps, device=device))
    tok, fp = store.tokenizer("base"), store.load_model("base", device)

    def val_bpb(model):  # the same 128 windows of the new book's validation split every time
        return runs.evaluate_on_book(store, model, tok, new_book, 128, torch.device(device))["val_bpb"]

    nf4 = quant.quantize_model(copy.deepcopy(fp))
    out = {"base_val_bpb": val_bpb(fp), "base_nf4_val_bpb": val_bpb(nf4), "nf4": quant.nf4_report(fp, nf4)}
    store.create_model("full", fp.config, model=fp, tokenizer=tok)
    tc = TrainConfig(steps=ft_steps, eval_every=ft_steps, warmup_steps=20, device=device)
    for label, lc in (("qlora", LoRAConfig(nf4=True)), ("lora", LoRAConfig()), ("full", None)):
        events = []
        if lc:
            runs.finetune(store, "base", [new_book], tc, label, lc, on_event=events.append)
            model = store.load_adapter("base", label, device)
        else:
            runs.train(store, "full", [new_book], tc, on_event=events.append)
            model = store.load_model("full", device)
        steps = [e for e in events if e["type"] == "step"][1:]  # the first step pays for warm-up
        step_s = sum(tc.batch_size * fp.config.max_seq_len / e["tokens_per_s"] for e in steps)
        out[label] = {"val_bpb": val_bpb(model), "steps_per_s": len(steps) / step_s,
                      "params": events[0]["params"], "precision": events[0]["precision"]}
    out["qlora"]["merged_val_bpb"] = val_bpb(merge_lora(store.load_adapter("base", "qlora", device, nf4=False)))
    return out


def timed_result(fn):
    """(fn(), seconds), waiting for the GPU, whose kernels run asynchronously."""
    out = []
    seconds = timed(lambda: out.append(fn()))
    return out[0], seconds


# ----------------------------------------------------------------------------- the peer


def load_peer():
    """HF transformers' GPT-2, built from our config; None when transformers is not installed."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()

    def model(cfg):
        hf = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                        n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                        attn_implementation="sdpa")
        return GPT2LMHeadModel(hf)

    def generate(model, prompt, sc):
        n = sc.max_new_tokens
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=sc.temperature,
                              top_k=sc.top_k, top_p=sc.top_p)

    def params(model):
        return sum(p.numel() for p in model.parameters())

    return {"model": model, "generate": generate, "params": params, "version": transformers.__version__}


# ----------------------------------------------------------------------------- quality per minute

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
        store.add_book("book", book.read_bytes(), book.name)
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
    probe.decide_compile()  # compiles if needed
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
            "precision": trainer.precision, "compiled": trainer.compiled,
            "best_step": trainer.run_best[1] if trainer.run_best else None, **val}


def _parse_set(kv):
    key, _, value = kv.partition("=")
    kind = type(getattr(TrainConfig(), key))
    return key, kind(float(value)) if kind is int else kind(value)


# ----------------------------------------------------------------------------- several processes


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
        store.add_book("book", book.read_bytes(), book.name)
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


# ----------------------------------------------------------------------------- look-inside views


def run_views(args):
    """Seconds per request of each /inside/... view: `python server.py` on a free port with a
    temp home (as a user runs it), two small-preset models trained briefly on the example book
    (`small` twice: two runs, two versions), then each request once cold (loads the model, encodes the
    book) and --calls times warm. Plus the sample the trainer writes at each evaluation, timed
    in-process, and the runs view over a long metrics.jsonl (rows copied to 20,000 steps)."""
    text = EXAMPLE_BOOK.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as home:
        url, proc = start_server(home)
        try:
            call = lambda method, path, **kw: httpx_call(url, method, path, **kw)  # noqa: E731
            call("POST", "/upload_book", files={"file": ("example.txt", text.encode())})
            for name in ("small", "other"):
                call("POST", "/create_model", json={"name": name, "preset": "small"})
            for name in ("small", "small", "other"):  # the views' cost hardly depends on the steps
                train_via_api(url, name, 20)
            views = {
                "tokens: a pasted paragraph": ("POST", "/inside/tokens", {"json": {"model": "small", "text": text[2000:3000]}}),
                "tokens: a book (144 KB) counted": ("POST", "/inside/tokens", {"json": {"model": "small", "book": "example"}}),
                "next token, top-k 5": ("POST", "/inside/next_token", {"json": {"model": "small", "prompt": text[:200], "top_k": 5}}),
                "embeddings, current weights": ("GET", "/inside/embeddings", {"params": {"model": "small", "n": 150}}),
                "embeddings, version v001": ("GET", "/inside/embeddings", {"params": {"model": "small", "n": 150, "version": "v001"}}),
                "NF4, mlp.c_fc of layer 3": ("GET", "/inside/nf4", {"params": {"model": "small", "layer": "transformer.h.3.mlp.c_fc"}}),
                "runs of two models (3 runs)": ("GET", "/inside/runs", {"params": [("model", "small"), ("model", "other")]}),
            }
            rows = [time_view(call, label, *spec, args.calls) for label, spec in views.items()]
            lengthen_metrics(Path(home) / "models" / "other" / "metrics.jsonl", 20_000)
            rows.append(time_view(call, "runs, a 20,000-step run", "GET", "/inside/runs", {"params": {"model": "other"}}, args.calls))
            rows.append(time_sample(Store(home), "small", args.calls))
        finally:
            proc.terminate()
            proc.wait(10)
    return {"meta": machine_info(pick_device("cpu"), args, EXAMPLE_BOOK, None), "views": rows}


def start_server(home):
    """`python server.py` on a free port over `home`; -> (url, process) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port), "--home", home], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx_call(url, "GET", "/health")
            return url, proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def httpx_call(url, method, path, **kw):
    try:
        r = httpx.request(method, url + path, timeout=120, **kw)
    except httpx.TransportError as e:
        raise OSError(str(e)) from e
    r.raise_for_status()
    return r.json()


def train_via_api(url, name, steps):
    httpx_call(url, "POST", "/train", json={"model": name, "book": "example", "steps": steps, "batch_size": 8,
                                            "eval_every": 10, "compile": "off"})
    while httpx_call(url, "GET", "/training_status")["state"] in ("queued", "running"):
        time.sleep(0.2)


def time_view(call, label, method, path, kw, calls):
    cold = timed(lambda: call(method, path, **kw))
    warm = [timed(lambda: call(method, path, **kw)) for _ in range(calls)]
    return view_row(label, cold, warm)


def view_row(label, cold, warm):
    row = {"view": label, "cold_ms": 1000 * cold, "median_ms": 1000 * statistics.median(warm), "max_ms": 1000 * max(warm)}
    log(row)
    return row


def lengthen_metrics(path, steps):
    """Copy a run's rows under a new run id until it has `steps` steps: a long run's file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, "a", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({**rows[step % len(rows)], "run": "long", "step": step}) + "\n")


def time_sample(store, name, calls):
    """The trainer's sample at an evaluation: runs.sampler on the stored model, 32 tokens."""
    model, tok = store.load_model(name).eval(), store.tokenizer(name)
    sample = runs.sampler(tok, runs.first_line(EXAMPLE_BOOK.read_text(encoding="utf-8")), TrainConfig(), "cpu")
    cold = timed(lambda: sample(model))
    warm = [timed(lambda: sample(model)) for _ in range(calls)]
    return view_row("sample at an evaluation (in the trainer, 32 tokens)", cold, warm)


# ----------------------------------------------------------------------------- report


def machine_info(device, args, book, peer):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": peer["version"] if peer else None, "book": book.name,
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_start": load_average()}


def log(row):
    """Progress on stderr: a full run takes minutes."""
    print(json.dumps(row, default=str), file=sys.stderr, flush=True)


def load_average():
    return [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def format_report(r):
    m = r["meta"]
    lines = [f"{m['date']}  {m['cpu']} ({m['cpu_capability']}), {m['threads']} threads, device {m['device']}, "
             f"torch {m['torch']}, transformers {m['transformers']}, load {m['loadavg_start']} -> {m.get('loadavg_end')}",
             f"command: {m['command']}", ""]
    if "views" in r:
        return "\n".join(lines + _table(["view", "cold ms", "warm median ms", "warm max ms"],
                                        [[x["view"], x["cold_ms"], x["median_ms"], x["max_ms"]] for x in r["views"]]))
    if "rows" in r:
        return "\n".join(lines + _table(["changes", "steps", "tokens", "wall s", "precision", "best step", "val bpb"],
                                        [[json.dumps(x["changes"]), x["steps"], x["tokens"], x["wall_s"], x["precision"],
                                          x["best_step"], f"{x['val_bpb']:.4f}"] for x in r["rows"]]))
    lines.append("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_gflops"].items()))
    lines += [""] + _table(
        ["preset", "prec", "B x T", "ours tok/s", "eager tok/s", "peer tok/s", "ours/peer", "eager/peer", "ours MFU",
         "peer MFU", "matmul-only tok/s", "matmul-only/peer", "ours peak MB", "peer peak MB", "estimate MB", "compile s"],
        [[x["preset"], x["precision"], f"{x['batch']} x {x['seq_len']}", x["ours_tok_s"], x.get("eager_tok_s"),
          x.get("peer_tok_s"), x.get("ours_ratio"), x.get("eager_ratio"), _pct(x["ours_mfu"]), _pct(x.get("peer_mfu")),
          x["matmul_only_tok_s"], x.get("matmul_only_ratio"), x["ours_peak_mb"], x.get("peer_peak_mb"), x["estimate_mb"],
          x["ours_setup_s"] if x.get("ours_compiled") else None] for x in r["train"]])
    lines += [""] + _table(
        ["preset", "prec", "new tokens", "ours KV cache tok/s", "ours no cache tok/s", "peer generate() tok/s", "ours/peer"],
        [[x["preset"], x["precision"], x["new_tokens"], x["ours_cache_tok_s"], x["ours_no_cache_tok_s"], x["peer_tok_s"],
          x["ratio"]] for x in r["generate"]])
    if r["nf4"]:
        q = r["nf4"]
        lines += ["", f"NF4 on {q['params']:,} Linear weights: {q['bits_per_param']:.3f} bits/param, quantize "
                      f"{q['quantize_mparams_s']:.1f} M params/s, dequantize {q['dequantize_mparams_s']:.1f} M params/s"]
    return "\n".join(lines)


def format_ddp(r):
    m = r["meta"]
    lines = [f"{m['date']}  {m['cpu']}, {os.cpu_count()} cores, device {m['device']}, torch {m['torch']}, "
             f"load {m['loadavg_start']} -> {m.get('loadavg_end')}", f"command: {m['command']}", ""]
    return "\n".join(lines + _table(
        ["preset", "processes", "batch per rank", "global batch x T", "precision", "tok/s", "speed-up", "efficiency"],
        [[x["preset"], x["procs"], x["batch_per_rank"], f"{x['global_batch']} x {x['seq_len']}", x["precision"],
          x["tok_s"], x["speedup"], _pct(x["efficiency"])] for x in r["rows"]]))


def _pct(x):
    return None if x is None else f"{100 * x:.0f}%"


def _table(header, rows):
    """A markdown table; floats get 3 significant digits (or 2 decimals when < 10)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


if __name__ == "__main__":
    main()
