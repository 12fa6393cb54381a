"""Speed tricks the trainer opts into. Each changes how fast a step runs, never what it computes.

1. **The chunked loss (`HeadLoss`, `TrainLoss`).** The logits are a training step's biggest
   tensor (small preset: 2048 rows x 5000 tokens, 41 MB in fp32, more than the weights and all
   other activations): written by the output matmul, read by the softmax, written again as their
   gradient, read by two more matmuls. Computed a chunk of 256 rows at a time, each chunk stays in
   the CPU's cache through all of that. The gradient of the mean cross-entropy with respect to the
   logits has a closed form, (softmax(logits) - onehot(target)) / N, so each chunk's share of the
   gradients is made right away and the chunk is dropped; backward only scales them. Never holding
   all the logits is also the idea of Cut Cross-Entropy (Wijmans et al. 2024) on GPUs.
2. **torch.compile** (`compile_decision`, `compile_loss`), where it pays: inductor fuses the
   elementwise work around the matmuls (LayerNorm, GELU, the softmax of attention written out).
   Whether it pays differs from CPU to CPU (and between fp32 and bf16 on one CPU), so "auto"
   measures it: a few eager and compiled steps of the user's own model (`CompileProbe`), kept
   per machine and config in a small JSON file, so the next run of that config needs no probe.
3. **Keeping freed memory** (`keep_freed_memory`): no page faults for each step's activations.

For one run, `compile_for_run` applies the decision to the trainer's loss (probing first where
"auto" has no numbers yet), and `seconds_per_step` times an eager step for the page's estimate.

BENCHMARKS.md measures each (`python -m bench`), as ratios against a peer in the same run.
"""

import ctypes
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import distributed
from files import write_json
from hardware import autocast, machine_kind
from muon import apply_gradients, make_optimizer
from sizing import HEAD_CHUNK, flops_per_token, window_len

# "auto" probes a run (times eager and compiled steps, compiling once) only if it is long enough
# to win the probe back. Matmul work of about a minute of eager training on 2 cores:
FLOPS_PER_MINUTE = 5e12
# a run shorter than this many minutes is not probed: the probe's compiling would take too much of it ...
COMPILE_MIN_MINUTES = 2.0
# ... nor, on a CPU in fp32, one so short that even the best gain compiling has given there would
# not pay for a probe: fp32 steps gained at most this share on the CPUs we measured (bf16 several
# times more), and a probe, compiling included, costs about PROBE_COST_S (BENCHMARKS.md, "Numbers
# that were in the code")
CPU_FP32_BEST_GAIN = 0.10
PROBE_COST_S = 30.0
PROBE_STEPS = 3  # timed forward+backward passes of each arm of the probe, after one untimed
# compiled steps must be at least this much faster than eager to be chosen: less is within the
# noise of a few steps on a shared machine, and "auto" must never be slower than eager
PROBE_MIN_GAIN = 0.05
USER_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # read before inductor sets it itself


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the output layer, x (N, C) @ w (V, C)^T, over targets (N,) (-1 = skip),
    computed a chunk of rows at a time, with its gradients made in the same pass."""

    CHUNK = HEAD_CHUNK  # rows: 256 x 5000 fp32 logits is 5 MB, cache-sized

    @staticmethod
    def forward(ctx, x, w, targets):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # fp16's range would flush the small gradient entries to zero before GradScaler scales them
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        n = (targets != -1).sum().clamp(min=1)
        w_lo = w.to(dtype)  # cast once, not once per chunk
        w_grad = w_lo if grad_dtype == dtype else w.to(grad_dtype)
        total = torch.zeros((), device=x.device)
        dx = torch.empty_like(x)
        dw = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # frozen under LoRA
        with torch.autocast(device, enabled=False):
            for i in range(0, x.size(0), HeadLoss.CHUNK):
                xc, tc = x[i:i + HeadLoss.CHUNK], targets[i:i + HeadLoss.CHUNK]
                keep = (tc != -1)[:, None]  # (n, 1)
                tc = tc.clamp(min=0)[:, None]
                # the mask and the 1/N scale go on the (n, C) side of each product, not on the (n, V)
                # chunk: (g * s) @ w == (g @ w) * s, and (g * s)^T @ xc == g^T @ (xc * s)
                scale = (keep / n).to(grad_dtype)  # (n, 1)
                p = (xc.to(dtype) @ w_lo.t()).float().softmax(-1)  # (n, C) x (C, V) -> (n, V)
                # -log p[target]; the clamp only bounds the loss of a target whose probability underflows
                total -= (p.gather(1, tc).clamp_(min=1e-38).log_() * keep).sum()
                g = p.scatter_add_(1, tc, torch.full_like(p[:, :1], -1.0)).to(grad_dtype)  # softmax - onehot
                if g.dtype == dx.dtype:
                    torch.mm(g, w_grad, out=dx[i:i + HeadLoss.CHUNK]).mul_(scale)  # (n, V) x (V, C), in place
                else:
                    dx[i:i + HeadLoss.CHUNK] = (g @ w_grad).mul_(scale)
                if dw is not None:
                    xs = xc.to(grad_dtype) * scale
                    if g.dtype == dw.dtype:
                        dw.addmm_(g.t(), xs)  # (V, n) x (n, C), accumulated without a (V, C) temporary
                    else:
                        dw += (g.t() @ xs).float()
                del p, g  # before the next chunk's logits: two (n, V) chunks alive at a time, not three
        ctx.save_for_backward(dx, None if dw is None else dw.to(w.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, None if dw is None else dw * grad_loss, None


class TrainLoss(nn.Module):
    """model(idx, targets)[1] for training, without ever holding the (B, T, V) logits. A module,
    so that torch.compile and DistributedDataParallel can wrap the whole loss computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        x = self.model.features(idx)  # (B, T, C)
        return HeadLoss.apply(x.flatten(0, 1), self.model.lm_head.weight, targets.flatten())


def compile_decision(setting, device, run_flops, minutes=0.0, measured=None, run_s=0.0, precision="fp32"):
    """-> (compile?, reason): whether to torch.compile the training loss, and why, in words the
    trainer shows. "on" and "off" are obeyed. "auto" decides by measurement: `measured`, a
    CompileProbe of this config on this machine, and `run_s`, the seconds the run would take in
    eager steps (see compile_pays). Without a measurement yet -> (None, reason): probe first.
    A run too short to win back a probe is not even probed (min_probe_minutes); nor is one
    without a C++ compiler (CPU) or on a device inductor does not cover (mps)."""
    if setting != "auto":
        return setting == "on", f"compile={setting} was asked for"
    if device.type not in ("cpu", "cuda"):
        return False, f"compile=auto measures compiling on CPU and CUDA only, not on {device.type}"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return False, "no C++ compiler for inductor's kernels"
    need, why = min_probe_minutes(device, precision)
    run_minutes = minutes or run_flops / FLOPS_PER_MINUTE
    if run_minutes < need:
        run = f"a {minutes:g}-minute budget" if minutes else f"a short run ({run_flops:.1e} FLOPs)"
        return False, f"{run}: {why}"
    if measured is None:
        return None, "not measured for this config on this machine yet: the run times eager and compiled steps first"
    return compile_pays(measured, run_s, measured.compile_s)


def min_probe_minutes(device, precision):
    """-> (minutes, reason): the shortest run for which compile="auto" probes, and why not below it."""
    if device.type == "cpu" and precision == "fp32":
        need = PROBE_COST_S / CPU_FP32_BEST_GAIN / 60
        return need, (f"in fp32 on a CPU compiling has saved at most {CPU_FP32_BEST_GAIN:.0%} of a step, too little "
                      f"to win back a ~{PROBE_COST_S:.0f} s probe in under {need:g} minutes")
    return COMPILE_MIN_MINUTES, "compiling would not pay back"


@dataclass
class CompileProbe:
    """What the probe measured on this machine: seconds per forward+backward of the training loss,
    eager and compiled (the median of PROBE_STEPS), and the seconds of the first compiled call,
    which compiles. The optimizer step is the same either way, so it is left out."""
    eager_s: float
    compiled_s: float
    compile_s: float

    def __str__(self):
        return (f"eager {1000 * self.eager_s:.0f} ms, compiled {1000 * self.compiled_s:.0f} ms per step, "
                f"compiling {self.compile_s:.0f} s")


def compile_pays(probe, run_s, compile_s):
    """-> (compile?, reason with the numbers): compiled steps must be faster by PROBE_MIN_GAIN at
    least, and the run, `run_s` seconds of eager steps, long enough that the time they save beats
    `compile_s`, the compiling still to be done (0 once the probe has compiled)."""
    gain = 1 - probe.compiled_s / probe.eager_s
    if gain < PROBE_MIN_GAIN:
        return False, f"measured {probe}: compiled is not faster beyond noise"
    if gain * run_s < compile_s:
        return False, f"measured {probe}: {gain:.0%} faster, too little over this run to win back compiling"
    return True, f"measured {probe}: compiled is {gain:.0%} faster"


def time_steps(step, n=PROBE_STEPS):
    """Median seconds of `n` calls of step() after one untimed call (caches, allocations)."""
    step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_probe(path, key):
    """The CompileProbe cached under `key` in the JSON file at `path`, or None. A file that is
    missing or damaged counts as empty: the probe runs again and rewrites it."""
    try:
        with open(path, encoding="utf-8") as f:
            return CompileProbe(**json.load(f)[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_probe(path, key, probe):
    try:
        with open(path, encoding="utf-8") as f:
            probes = json.load(f)
        if not isinstance(probes, dict):
            probes = {}
    except (OSError, ValueError):
        probes = {}
    probes[key] = asdict(probe)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, probes)


def seconds_per_step(model, tc, precision, steps=3):
    """A probe: the wall time of one eager training step (forward, backward, clipping, the optimizer's step) of
    `model` at tc's batch and window, the median of `steps` steps after a warm-up step. The work of
    a step does not depend on the tokens, so they are random, and the steps change `model`: give it
    a throwaway one. What a page shows before a run starts: time per 1000 steps on this machine."""
    model.train()
    device = next(model.parameters()).device
    T = window_len(tc, model.config)
    loss_fn, optimizer = TrainLoss(model), make_optimizer(model, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randint(model.config.vocab_size, (tc.batch_size, T + 1), device=device)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(tc.grad_accum):
            with autocast(device, precision):
                loss = loss_fn(x[:, :-1], x[:, 1:])
            scaler.scale(loss).backward()
        apply_gradients(model, optimizer, scaler, tc.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[steps // 2]


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory in the process instead of handing it back to the
    kernel. By default every tensor above the mmap threshold gets fresh pages from the kernel and
    returns them when freed, and freed heap is trimmed, so each training step's activations are
    page-faulted in and zeroed again (thousands of faults per step). With mmap and trimming off the
    steps reuse the same memory, as jemalloc or tcmalloc would; the process keeps its peak.
    Returns whether it was applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


def cache_compiles_in(folder):
    """Keep inductor's cache of compiled kernels in `folder` (the data folder's cache/), not in
    /tmp/torchinductor_<user>, unless the user chose a place with TORCHINDUCTOR_CACHE_DIR.
    Inductor reads the variable each time it compiles."""
    if USER_COMPILE_CACHE is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def use_fused_attention(loss, on):
    """Switch `loss`'s attention between the fused kernel (eager) and the formula written out."""
    for m in loss.modules():
        if hasattr(m, "fused"):
            m.fused = on


def compile_loss(loss, device, try_step):
    """torch.compile'd `loss` module, or `loss` itself with the reason when compiling fails.
    Compilation happens at the first call, so `try_step(compiled)` makes that call now (a
    forward and backward on a dummy batch): a missing C++ compiler or an op inductor cannot
    handle then means training eagerly, with a note, instead of a failed run."""
    if device.type == "cpu":  # inductor fuses the written-out attention; the fused CPU kernel is slow here
        use_fused_attention(loss, False)
    compiled = torch.compile(loss)
    try:
        try_step(compiled)
    except Exception as e:  # any failure of the compiler means: run without it
        use_fused_attention(loss, True)
        return loss, f"torch.compile failed, training without it: {str(e).strip()[:300]}"
    return compiled, None


# ----------------------------------------------------------------------------- one run's decision


def compile_choice(cfg, tc, T, device, precision, probe_file=None):
    """-> (compile?, reason) for the run `tc` describes: compile_decision given its work and,
    for compile="auto", the probe of this config on this machine saved in `probe_file` (compile?
    is None when there is none yet: the trainer probes at its start)."""
    run_flops = tc.steps * tc.grad_accum * tc.batch_size * T * flops_per_token(cfg, T)
    key = probe_key(cfg, tc, T, device, precision)
    measured = load_probe(probe_file, key) if probe_file and tc.compile == "auto" else None
    run_s = run_seconds(tc, measured.eager_s) if measured else 0.0
    return compile_decision(tc.compile, device, run_flops, tc.minutes, measured, run_s, precision)


def probe_key(cfg, tc, T, device, precision):
    """The cache key of a probe: what its timings depend on (the machine kind names the CPU or GPU,
    its vector instructions, the threads and the torch version; DDP: the number of processes)."""
    machine = machine_kind(device) + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    return json.dumps({"machine": machine, "config": cfg.to_dict(), "batch_size": tc.batch_size, "seq_len": T,
                       "precision": precision}, sort_keys=True)


def run_seconds(tc, eager_s, step=0):
    """How long the rest of the run would take in eager forward+backward passes: its --minutes
    budget, or its steps (from `step` on) at eager_s per pass."""
    return tc.minutes * 60 if tc.minutes else (tc.steps - step) * tc.grad_accum * eager_s


def compile_for_run(loss, model, tc, T, precision, probe_file=None, step=0):
    """torch.compile the training `loss` of `model` when compile_decision says it pays, measuring
    it first when "auto" has no measurement for this config here (once) -> (loss, compiled?,
    reason, note): the loss to train with, why, and a note if compiling failed. Evaluation and
    self-play use the eager model: other shapes, no recompiles."""
    device = next(model.parameters()).device
    # DDP: rank 0's probe file decides for every rank
    on, reason = distributed.broadcast(compile_choice(model.config, tc, T, device, precision, probe_file))
    if on is False:
        return loss, False, reason, None
    x = torch.zeros(tc.batch_size, T, dtype=torch.long, device=device)

    def try_step(compiled):
        model.train()
        try:
            with autocast(device, precision):
                compiled(x, x).backward()
        finally:
            model.zero_grad(set_to_none=True)

    if on is None:
        key = probe_key(model.config, tc, T, device, precision)
        return probe_compile(loss, try_step, device, probe_file, key, lambda eager_s: run_seconds(tc, eager_s, step))
    compiled, note = compile_loss(loss, device, try_step)
    if note:
        return loss, False, "torch.compile failed", note
    return compiled, True, reason, None


def probe_compile(loss, try_step, device, probe_file, key, run_s):
    """compile="auto" without a measurement: time forward+backward of the model eager, then
    compiled; keep the compiled loss if compile_pays over `run_s(eager_s)` seconds of the run, and
    save the numbers to probe_file under `key` -> as compile_for_run. The probe draws its dropout
    from a forked RNG: the run's random numbers are the same with it or without it. Its seconds
    count against a --minutes budget, like the compiling."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eager_s = time_steps(lambda: try_step(loss))
        t0 = time.perf_counter()
        compiled, note = compile_loss(loss, device, try_step)
        if note:
            return loss, False, "torch.compile failed", note
        compile_s = time.perf_counter() - t0
        probe = CompileProbe(eager_s, time_steps(lambda: try_step(compiled)), compile_s)
    probe = distributed.broadcast(probe)  # DDP: every rank follows rank 0's numbers
    if probe_file and distributed.is_main():
        save_probe(probe_file, key, probe)
    on, reason = compile_pays(probe, run_s(probe.eager_s), 0.0)
    if on:
        return compiled, True, reason, None
    use_fused_attention(loss, True)
    return loss, False, reason, None
