"""Training speed against the peer, in the same process and alternating rounds (`python -m bench`).

Train tokens/s in steady state (after warm-up) for each preset and precision: our trainer as
users run it, without torch.compile ("eager", when ours compiles), and HF's GPT-2 of the same
config; MFU, model FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): flops_per_token x
tokens/s over the peak of *this* machine, measured with a large matmul in the same dtype;
matmul-only tokens/s, the time of a step's matmuls alone at their shapes, the ceiling any trainer
could reach; peak memory of a step (memory.py); generation rows (generation.py); NF4's bits per
parameter and speed (quant.py)."""

import collections
import statistics
import tempfile
import time
from dataclasses import replace

import torch

import quant
from azr_trainer import TrainConfig, get_batch
from hardware import DTYPES, autocast, pick_device
from model import GPT, PRESETS
from schedule import lr_share
from sizing import flops_per_token, memory_estimate
from app.store import Store
from bench.common import (EXAMPLE_BOOK, SHAKESPEARE, TINY, interleave, load_average, load_peer, log,
                          machine_info, make_trainer, pick_precisions, timed)
from bench.generation import generate_row
from bench.memory import step_peak_bytes


# (batch, seq_len) of the train rows: the shapes the peer numbers were taken at
SHAPES = {"tiny": (16, 128), "small": (16, 128), "medium": (8, 256), "large": (4, 512)}
FULL = dict(rounds=7, steps_per_round=4, warmup_steps=4, new_tokens=200, gen_rounds=3, matmul_n=2048)
QUICK = dict(rounds=2, steps_per_round=1, warmup_steps=1, new_tokens=8, gen_rounds=1, matmul_n=256)


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
        store.books.add("book", book.read_bytes(), book.name)
        for name, cfg in presets.items():
            B, T = (4, 32) if args.quick else SHAPES[name]
            for prec in precisions:
                compile_ = args.compile or ("off" if args.quick else "on")
                # AdamW, the peer's optimizer: these rows time the engine (Muon's cost: `python -m bench profile`)
                tc = TrainConfig(batch_size=B, seq_len=T, precision=prec, device=str(device), compile=compile_,
                                 optimizer="adamw")
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


def train_row(store, preset, cfg, tc, peer, sizes):
    """Steady-state train tokens/s in alternating rounds of: our trainer as configured ("ours"),
    our trainer without torch.compile ("eager", when ours compiles) and the peer."""
    contestants, setup_s, tok = {}, {}, None
    for k, compile_ in [("eager", "off")] * (tc.compile == "on") + [("ours", tc.compile)]:
        t0 = time.perf_counter()
        name = f"{preset}-{tc.precision}-{k}"
        trainer = make_trainer(store, name, cfg, replace(tc, compile=compile_), tok)
        trainer.stepper.decide_compile(trainer.tc, trainer.step)
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
                                          compiled=contestants["ours"].trainer.stepper.compiled,
                                          optimizer=tc.optimizer)["total"] / 2**20,
           "ours_compiled": contestants["ours"].trainer.stepper.compiled,
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
        trainer.stepper.train_step(lr_share(trainer.step, trainer.tc))
        trainer.step += 1

    step.trainer, step.model, step.optimizer = trainer, trainer.model, trainer.stepper.optimizer
    return step


def peer_train_step(peer, trainer):
    """The loop a user of transformers would write: same batches, autocast, clipping, AdamW."""
    model = peer["model"](trainer.cfg).to(trainer.device)
    optimizer = peer_optimizer(model, trainer.tc)

    def step():
        x, _ = get_batch(trainer.data["train"], trainer.tc.batch_size, trainer.T, trainer.stepper.batch_gen,
                         trainer.device)
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
