"""Quality per minute against nanoGPT's CPU recipe, on nanoGPT's own split of tinyshakespeare.

nanoGPT's README trains a character-level GPT on a CPU with `shakespeare_char` and
`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`
(0.8 M parameters). Its data script splits the text by characters: train = the first 90 %,
val = the last 10 % — a different play from most of the training text, so this is harder than
our own interleaved split.

Both sides here are whole processes timed from outside, on the same machine in the same run, and
both get the same wall clock:
- the peer: that recipe (the numbers of nanoGPT's config and README: AdamW betas (0.9, 0.99),
  weight decay 0.1 on matrices, lr 1e-3 with 100 warm-up iterations and a cosine to 1e-4,
  gradient clip 1, evaluation every 250 iterations on 20 batches of each split, a checkpoint of
  the weights whenever that estimate of val loss is a new best, fp32, no compile) on transformers'
  `GPT2LMHeadModel` (nanoGPT's model is GPT-2 without biases; transformers' has them). Its 2,000
  iterations take a machine-dependent time, so its iteration count (max_iters = lr_decay_iters,
  as the issue's `--max_iters 4500 --lr_decay_iters 4500`) is fitted to our budget: re-fitted every
  REFIT_EVERY iterations from its time per iteration so far (evaluations included), with one more
  evaluation at the last iteration, so its run ends on time and evaluated; its best checkpoint is
  scored;
- ours: `cli.py create` + `cli.py train --minutes M` on a file holding the first 90 %, with every
  default a user gets (our own train/val split of that file for evaluations and keep_best).
Both are then scored the same way on the last 10 %: every character (byte: the text is ASCII)
of it, in non-overlapping windows of the model's full context, bits per character.

With --concurrent the two run at the same time, each in its own process (with --threads 1: one
core each), so load from other work on the machine hits both alike.

    python -m bench quality --vs-nanogpt --minutes 3,5,15
    python -m bench quality --vs-nanogpt --preset tiny --minutes 3 --concurrent --threads 1
    python -m bench quality --vs-nanogpt --minutes 3 --no-nanogpt --model vocab_size=1024 --set batch_size=8
"""

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, SHAKESPEARE
from evaluate import evaluate_bpb
from model import PRESETS
from app.store import Store

# nanoGPT's shakespeare_char config with its README's CPU overrides
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr_decay_iters=2000,
              learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
              grad_clip=1.0, eval_interval=250, eval_iters=20, seed=1337)
REFIT_EVERY = 50  # iterations between re-fits of the peer's iteration count to the time left


def split(text):
    """nanoGPT's prepare.py: train = the first 90 % of the characters, val = the rest."""
    n = int(0.9 * len(text))
    return text[:n], text[n:]


# ----------------------------------------------------------------------------- the peer


def peer_main(book, out, seconds):
    """Run in its own process: nanoGPT's recipe for `seconds`, then bits/char on the whole val text."""
    import transformers  # noqa: F401 (peer_model's): imported before the clock starts
    t_start = time.perf_counter()  # like ours: the budget starts once the libraries are imported
    r = dict(RECIPE)
    torch.manual_seed(r["seed"])
    train_text, val_text = split(Path(book).read_text())
    chars = sorted(set(train_text + val_text))  # nanoGPT's vocabulary: every character of the file
    stoi = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([stoi[c] for c in train_text])
    val = torch.tensor([stoi[c] for c in val_text])
    model = peer_model(len(chars), r)
    opt = peer_optimizer(model, r)

    def batch(data):
        ix = torch.randint(len(data) - r["block_size"], (r["batch_size"],))
        x = torch.stack([data[i:i + r["block_size"]] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + r["block_size"]] for i in ix])
        return x, y

    def loss_of(x, y):
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    best_val, best_state, t_loop, it = math.inf, None, time.perf_counter(), 0
    while True:  # nanoGPT's loop: iterations 0..max_iters
        if seconds and it and it % REFIT_EVERY == 0:  # fill the budget: the iterations that fit at this pace
            left = (seconds - (time.perf_counter() - t_start)) / ((time.perf_counter() - t_loop) / it)
            r["max_iters"] = it + max(0, int(left))
            r["lr_decay_iters"] = max(r["max_iters"], r["warmup_iters"] + 1)
        if it % r["eval_interval"] == 0 or it == r["max_iters"]:  # nanoGPT's estimate_loss: part of the recipe's time
            model.eval()
            with torch.no_grad():
                for data in (train, val):
                    est = sum(loss_of(*batch(data)).item() for _ in range(r["eval_iters"])) / r["eval_iters"]
            model.train()
            if it > 0 and est < best_val:  # nanoGPT writes ckpt.pt only on a new best val estimate
                best_val, best_state = est, copy.deepcopy(model.state_dict())
        if it == r["max_iters"]:
            break
        for g in opt.param_groups:
            g["lr"] = recipe_lr(it, r)
        loss_of(*batch(train)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        it += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    Path(out).write_text(json.dumps({"iters": it, "best_val_estimate": round(best_val, 4),
                                     "bits_per_char": bits_per_char(model, val, r["block_size"]),
                                     "params": sum(p.numel() for p in model.parameters())}))


def peer_model(vocab_size, r):
    """The recipe's model on transformers' GPT-2 (nanoGPT's without biases is not in transformers)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=r["block_size"], n_embd=r["n_embd"], n_layer=r["n_layer"],
        n_head=r["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=0))


def peer_optimizer(model, r):
    """nanoGPT's configure_optimizers: AdamW, weight decay on matrices only."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": r["weight_decay"]},
                              {"params": others, "weight_decay": 0.0}],
                             lr=r["learning_rate"], betas=(r["beta1"], r["beta2"]))


def recipe_lr(it, r):
    """nanoGPT's get_lr: linear warm-up, then a cosine down to min_lr at lr_decay_iters."""
    if it < r["warmup_iters"]:
        return r["learning_rate"] * (it + 1) / (r["warmup_iters"] + 1)
    ratio = min(1.0, (it - r["warmup_iters"]) / (r["lr_decay_iters"] - r["warmup_iters"]))
    return r["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (r["learning_rate"] - r["min_lr"])


@torch.no_grad()
def bits_per_char(model, val, T):
    """Bits per character on every character of `val`, in non-overlapping windows of T."""
    model.eval()
    n = (len(val) - 1) // T
    nats = sum(torch.nn.functional.cross_entropy(
        model(val[i * T:(i + 1) * T][None]).logits[0], val[i * T + 1:(i + 1) * T + 1], reduction="sum").item()
        for i in range(n))
    return nats / math.log(2) / (n * T)


def run_peer(book, minutes, env):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "peer.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.vs_nanogpt", "--peer", str(book), str(out), str(minutes * 60)],
                       cwd=ROOT, check=True, env=env)
        wall = time.perf_counter() - t0
        return {"who": "nanoGPT recipe (transformers GPT2)", "minutes": minutes, "wall_s": round(wall, 1),
                **json.loads(out.read_text())}


# ----------------------------------------------------------------------------- ours


def run_ours(book, minutes, preset, model_changes, train_changes, env):
    """`cli.py create` + `cli.py train --minutes`, timed as processes, then scored on the val text."""
    train_text, val_text = split(Path(book).read_text())
    with tempfile.TemporaryDirectory() as home:
        train_file = Path(home) / "shakespeare_train.txt"
        train_file.write_text(train_text)
        env = {**env, "AZR_HOME": home}
        cli = [sys.executable, str(ROOT / "cli.py")]
        create = cli + ["create", "q", "--preset", preset] + flags(model_changes)
        train = cli + ["train", "q", "--book", str(train_file), "--minutes", str(minutes)] + flags(train_changes)
        t0 = time.perf_counter()
        subprocess.run(create, check=True, env=env, stdout=subprocess.DEVNULL)
        log = subprocess.run(train, check=True, env=env, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
        store = Store(home)
        model, tok = store.load_model("q"), store.tokenizer("q")
        ids = np.array(tok.encode(val_text), dtype=np.int64)
        byte_len = torch.from_numpy(tok.byte_lengths())
        T = model.config.max_seq_len
        score = evaluate_bpb(model, ids, byte_len, T, 10**9, torch.device("cpu"))
        last = log.strip().splitlines()[-1]
        summary = json.loads(last) if last.startswith("{") else {}
        steps = store.lineage("q")["steps"]
        evals = [[r["step"], r["val_bpb"]] for r in store.metrics("q") if "val_bpb" in r]  # on our own val split
    return {"who": "ours", "minutes": minutes, "preset": preset, "model": model_changes, "train": train_changes,
            "wall_s": round(wall, 1), "steps": steps, "bits_per_char": score["val_bpb"],
            "log": log.strip().splitlines()[:1], "evals": evals,
            "why": [line for line in log.splitlines() if line.startswith(("plateau", "early stop"))],
            **{k: summary.get(k) for k in ("precision", "compiled", "best", "status", "end_reason")}}


def flags(changes):
    return [a for k, v in changes.items() for a in ("--" + k.replace("_", "-"), str(v))]


def parse_kv(items):
    out = {}
    for kv in items:
        key, _, value = kv.partition("=")
        out[key] = value
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench quality --vs-nanogpt", description=__doc__.split("\n")[0])
    p.add_argument("--book", default=str(SHAKESPEARE))
    p.add_argument("--minutes", default="3,5,15", help="comma list of our training budgets")
    p.add_argument("--no-nanogpt", action="store_true", help="skip the peer (rows of ours only)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="our model's preset")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="a `cli.py create` flag")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a `cli.py train` flag")
    p.add_argument("--concurrent", action="store_true", help="run the peer and ours at the same time")
    p.add_argument("--threads", type=int, default=0, help="torch threads of each side (OMP_NUM_THREADS; 0 = default)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    rows = []
    for m in map(float, args.minutes.split(",")):
        ours = lambda: run_ours(args.book, m, args.preset, parse_kv(args.model), parse_kv(args.set), env)  # noqa: E731
        if args.no_nanogpt:
            rows.append(ours())
        else:
            with ThreadPoolExecutor(2 if args.concurrent else 1) as pool:  # one worker: the peer, then ours
                peer, mine = pool.submit(run_peer, args.book, m, env), pool.submit(ours)
                rows += [peer.result(), mine.result()]
            rows[-1]["vs_peer"] = round(rows[-1]["bits_per_char"] / rows[-2]["bits_per_char"], 4)
            rows[-1]["concurrent"] = args.concurrent
            print(json.dumps(rows[-2]), flush=True)
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peer"]:
        peer_main(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
