"""What the benchmarks share: the books, the peer (Hugging Face transformers' GPT-2 built from our
config), timing in alternating rounds, the machine's description and the report tables."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from app import runs
from app.records import new_run
from hardware import pick_precision
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository
BOOKS = ROOT.parent / "shared" / "books"  # public-domain books for benchmarks, never committed here
SHAKESPEARE = BOOKS / "tinyshakespeare.txt"
EXAMPLE_BOOK = ROOT / "books" / "example_book.txt"
TINY = ModelConfig(512, 32, 2, 2, 64, 32)  # --quick: the test suite's tiny model


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


def timed_result(fn):
    """(fn(), seconds), waiting for the GPU, whose kernels run asynchronously."""
    out = []
    seconds = timed(lambda: out.append(fn()))
    return out[0], seconds


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
            "command": " ".join(["python -m bench"] + sys.argv[1:]), "loadavg_start": load_average()}


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
