"""A/B: supervised-only vs supervised + self-play (selfplay.py) at equal wall-clock time.

Both arms start from the same initial weights with the same tokenizer and the trainer's defaults
(the small preset; TrainConfig's optimizer, schedule and batch; fp32 and no torch.compile in
either arm, so neither gets a speed-up the other lacks). The arms live in ONE process and
alternate step by step, the next step always going to the arm that has used less wall time
(time.perf_counter), so a neighbour's load hits both alike. The lr follows each arm's
share of the budget spent, so both warm up and decay over the same time however many steps each
one fits in. In the self-play arm, once `start` of the budget is spent, every `every`-th step is a
self-play step instead of a supervised one.

With start > 0 the arms are one and the same supervised run until then: that prefix is trained
once and copied into every arm. A step 10x slower than its kind's median (the shared machine sometimes freezes a
process for minutes) is charged the median and counted as a stall.

Evaluation of each arm's final weights (not charged to either clock):
- val bits/byte over the whole val split;
- `prompts` evenly spaced val prefixes of `prompt_tokens` tokens, continued for `gen_tokens`
  tokens greedily and at temperature 0.8 (no top-k/top-p; same seed in both arms): seq-rep-4,
  loop rate (share of continuations whose second half repeats an 8-gram of the continuation),
  distinct-2, each beside the real continuation's own value;
- copy rate: share of generated 8-grams found verbatim in the train split, beside real val text's;
- rare rate: share of generated tokens seen fewer than 5 times in the train split (catches a
  model that stops repeating by emitting junk tokens).

    python -m bench selfplay --book ../shared/books/tinyshakespeare.txt --minutes 6 --start 0.4 --every 3 --seeds 3
    python -m bench selfplay --book B --arms "supervised,selfplay,selfplay@loss=ul;every=2"   # variants, one process

--user-path instead runs what a user runs: `cli.py create` with every default, then two
`cli.py train NAME --book B --minutes M --seed S` processes AT ONCE (one thread each, so a
neighbour's load hits both alike), one with self-play (`--selfplay-every`, the A/B's --every) and
one with `--selfplay-every 0`, every other option the trainer's default (early stopping,
keep-best, the plateau switch). Then the same evaluation of each finished model.

    python -m bench selfplay --user-path --book ../shared/books/tinyshakespeare.txt --minutes 3 --every 3
"""

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from app import runs
from azr_trainer import TrainConfig
from evaluate import evaluate_bpb
from schedule import lr_share
from generate import rollouts
from hardware import autocast
from app.inside import distinct_n, ngrams, seq_rep_n
from model import PRESETS
from selfplay import SelfPlay, SelfPlayConfig, mark_repeats, windows
from app.records import new_run
from app.store import Store
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

BOOK = "book"  # the --book file's name in each seed's own store
SCHEDULE_STEPS = 1000  # the lr schedule runs over the budget in 1000 virtual steps (warm-up: 50)


@dataclass
class ABConfig:
    book: str
    minutes: float = 3.0  # wall time per arm and seed
    seeds: int = 1
    first_seed: int = 0  # the seeds are first_seed, first_seed + 1, ...: a later run adds seeds to an earlier one
    jobs: int = 1  # seeds trained at once, one process (one thread) each
    arms: str = "supervised,selfplay"  # also selfplay@key=value;... variants (SelfPlayConfig fields, every, start)
    every: int = 3  # a self-play step replaces every `every`-th step of the self-play arm
    start: float = 0.0  # ... once this share of the budget is spent
    prompts: int = 100
    prompt_tokens: int = 28  # 28 + 100 new tokens fit the context of 128 without a sliding window
    gen_tokens: int = 100
    curve: int = 0  # also measure val bits/byte (64 windows) at this many points of the budget
    precision: str = "fp32"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench selfplay", description=__doc__.split("\n")[0])
    for f in fields(ABConfig):
        p.add_argument("--" + f.name, type=type(f.default) if f.name != "book" else str,
                       default=None if f.name == "book" else f.default, required=f.name == "book")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a SelfPlayConfig field")
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--user-path", action="store_true", help="two cli.py train processes at once (see above)")
    args = vars(p.parse_args(argv))
    ab = ABConfig(**{f.name: args[f.name] for f in fields(ABConfig)})
    sp_cfg = parse_overrides(args["set"], SelfPlayConfig())
    seeds = list(range(ab.first_seed, ab.first_seed + ab.seeds))
    if args["user_path"]:
        per_seed = [user_path(ab, s) for s in seeds]
    elif ab.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(ab.jobs, 2)) as pool:  # shared machine: 2 at most
            per_seed = pool.starmap(one_seed, [(ab, sp_cfg, s) for s in seeds])
    else:
        per_seed = [one_seed(ab, sp_cfg, s) for s in seeds]
    out = {"ab": asdict(ab), "selfplay": asdict(sp_cfg), "seeds": per_seed}
    out["table"] = table(out)
    print(out["table"])
    if args["out"]:
        with open(args["out"], "w") as f:
            json.dump(out, f, indent=1)


def parse_overrides(pairs, base):
    changes = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        changes[key] = type(getattr(base, key))(value)
    return replace(base, **changes)


# ----------------------------------------------------------------------------- the user's path


def user_path(ab, seed):
    """Both arms as `cli.py train` processes started together; -> the same dict as one_seed."""
    home = Path(tempfile.mkdtemp(prefix=f"sp-user{seed}-"))
    arms = {"supervised": ["--selfplay-every", "0"], "selfplay": ["--selfplay-every", str(ab.every)]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        procs = {}
        for a, flags in arms.items():
            cli = [sys.executable, str(ROOT / "cli.py"), "--home", str(home / a)]
            subprocess.run([*cli, "create", "m", "--seed", str(seed)], check=True, env=env, capture_output=True)
            log_file = open(home / f"{a}.log", "w")
            procs[a] = (subprocess.Popen([*cli, "train", "m", "--book", str(Path(ab.book).resolve()), "--minutes",
                                          str(ab.minutes), "--seed", str(seed), *flags], env=env, stdout=log_file,
                                         stderr=subprocess.STDOUT), time.perf_counter())
        spent = {}
        for a, (proc, t0) in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"{a} failed: " + (home / f"{a}.log").read_text()[-2000:])
            spent[a] = {"seconds": round(time.perf_counter() - t0, 1), **run_numbers(Store(home / a))}
        return evaluate_models({a: Store(home / a) for a in arms}, spent, ab, seed)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_numbers(store):
    """Steps, self-play steps, the plateau, the kept step and every evaluation ([step, val bits/byte,
    greedy repeats]) of model m's run, from its metrics."""
    rows = store.metrics("m")
    sp = [r["selfplay"] for r in rows if "selfplay" in r]
    only = [r["step"] for r in rows if "selfplay" in r and "loss" not in r]
    kept = store.lineage("m")["runs"][-1]["best"]
    peak = max(r["lr"] for r in rows)  # the decay begins after the last step at the peak (a plateau brings it in)
    return {"steps": rows[-1]["step"], "selfplay_steps": len(sp), "plateau_step": only[0] - 1 if only else None,
            "decay_step": max(r["step"] for r in rows if r["lr"] == peak),
            "kept_step": kept[1] if kept else None, **trend(sp),
            "evals": [[r["step"], r["val_bpb"], r.get("greedy_repeats")] for r in rows if "val_bpb" in r]}


def evaluate_models(stores, spent, ab, seed):
    """The evaluation of evaluate_arm for each store's model m, on its book's own split."""
    out = {"arms": {}}
    for a, store in stores.items():
        tok, data, _, _ = runs.prepare_data(store, "m", [str(Path(ab.book).resolve())], allow_paths=True)
        model = store.load_model("m").eval()
        ev = SimpleNamespace(model=model, data=data, device=torch.device("cpu"), precision=ab.precision,
                             evaluate=lambda max_windows, m=model, d=data, t=tok: evaluate_bpb(
                                 m, d["val"], torch.from_numpy(t.byte_lengths()), m.config.max_seq_len, max_windows,
                                 torch.device("cpu")))
        if "real" not in out:
            tasks = heldout_tasks(ev, ab)
            train = np.asarray(data["train"])
            train_grams = (np.unique(ngram_hashes(train, 8)), np.bincount(train, minlength=model.config.vocab_size))
            out["real"] = real_rates(tasks, train_grams)
        out["arms"][a] = {**spent[a], **evaluate_arm(ev, tok, tasks, train_grams, ab, seed)}
        log(seed, f"{a}: {json.dumps({k: v for k, v in out['arms'][a].items() if 'examples' not in k})}")
    return out


# ----------------------------------------------------------------------------- one seed


def one_seed(ab, sp_cfg, seed):
    torch.set_num_threads(1)
    home = tempfile.mkdtemp(prefix=f"sp-ab{seed}-")
    try:
        store = Store(home)
        store.books.add(BOOK, Path(ab.book).read_bytes(), Path(ab.book).name)
        _, text, _ = store.books.resolve(BOOK)
        tok_path = store.home / "tokenizer.json"
        Tokenizer.train([text], PRESETS["small"].vocab_size).save(tok_path)
        arms = {a: make_arm(store, f"arm{i}", tok_path, seed, ab) for i, a in enumerate(ab.arms.split(","))}
        t0 = time.perf_counter()
        start = shared_prefix(arms, ab, seed)
        stages = {a: make_stage(a, tr, sp_cfg, seed, ab) for a, tr in arms.items()}
        sched = {a: arm_options(a, ab, sp_cfg)[:2] for a in arms if a.startswith("selfplay")}
        spent = train_for_budget(arms, stages, ab, seed, start, sched=sched)
        log(seed, f"trained in {time.perf_counter() - t0:.0f} s wall")
        tasks = heldout_tasks(arms["supervised"], ab)
        train = np.asarray(arms["supervised"].data["train"])
        tok = Tokenizer.load(tok_path)  # every arm's
        train_grams = (np.unique(ngram_hashes(train, 8)), np.bincount(train, minlength=PRESETS["small"].vocab_size))
        out = {"real": real_rates(tasks, train_grams), "arms": {}}
        for a, tr in arms.items():
            out["arms"][a] = {**spent[a], **evaluate_arm(tr, tok, tasks, train_grams, ab, seed)}
            log(seed, f"{a}: {json.dumps({k: v for k, v in out['arms'][a].items() if 'examples' not in k})}")
        return out
    finally:
        shutil.rmtree(home, ignore_errors=True)


def make_arm(store, name, tok_path, seed, ab):
    store.create_model(name, PRESETS["small"], seed=seed)  # same seed: every arm starts from the same weights
    (store.model_dir(name) / "tokenizer.json").write_bytes(tok_path.read_bytes())
    tc = TrainConfig(steps=SCHEDULE_STEPS, seed=seed, device="cpu", precision=ab.precision, compile="off")
    return runs.make_trainer(store, name, new_run([BOOK], tc))


def arm_options(arm, ab, sp_cfg):
    """"selfplay@ul_coef=8;every=2" -> (every, start, SelfPlayConfig) of that variant."""
    _, _, opts = arm.partition("@")
    pairs = [p for p in opts.split(";") if p]
    sched = dict(p.split("=") for p in pairs if p.split("=")[0] in ("every", "start"))
    cfg = parse_overrides([p for p in pairs if p.split("=")[0] not in sched and p != "loss=ul"], sp_cfg) \
        if arm.startswith("selfplay") else None
    return int(sched.get("every", ab.every)), max(ab.start, float(sched.get("start", ab.start))), cfg


def make_stage(arm, tr, sp_cfg, seed, ab):
    if arm.startswith("selfplay"):
        stage = ULSelfPlay if "loss=ul" in arm else SelfPlay
        return stage(tr.model, tr.stepper.optimizer_step, tr.data["train"], tr.precision, seed,
                     arm_options(arm, ab, sp_cfg)[2])
    return None


class ULSelfPlay(SelfPlay):
    """The ablation `selfplay@loss=ul`: plain greedy rollouts, and the plain unlikelihood loss on
    every token that completes a repeated 4-gram, -log(1 - p) over the whole vocabulary."""

    def roll_out(self, prompts):
        with autocast(self.device, self.precision):
            outs = rollouts(self.model, prompts, self.n)  # (R, n)
        marks = torch.tensor([mark_repeats(r, self.cfg.ngram, self.allow) for r in outs.tolist()], device=self.device)
        return outs, torch.where(marks, outs, -1)  # the repeat is the token taken

    def loss(self, logits, wanted, outs, marks):
        # divided by all rollout tokens, as Welleck et al. do
        return unlikelihood_loss(logits, outs, marks) / (self.cfg.rollouts * self.n)


def unlikelihood_loss(logits, tokens, marks):
    """Sum over marked tokens of -log(1 - p(token)) (Welleck et al. 2020, eq. 4 with the candidates
    of §5.2). logits (B, n, V), tokens and marks (B, n). The gradient on the token's logit is p, so
    the surest repeats are pushed hardest; 1 - p is clamped so a certain one stays finite."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, n)
    one_minus_p = (-torch.expm1(logp)).clamp(min=1e-5)  # 1 - p without cancellation near p = 1
    return -(torch.log(one_minus_p) * marks).sum()


def shared_prefix(arms, ab, seed):
    """With start > 0 the arms are the same run until then: train that part once, supervised, and
    copy its state (weights, AdamW moments, batch sampler) into every arm."""
    if not ab.start:
        return {"used": 0.0, "steps": 0, "curve": []}
    tr = arms["supervised"]
    res = train_for_budget({"supervised": tr}, {"supervised": None}, replace(ab, minutes=ab.minutes * ab.start), seed,
                           {"used": 0.0, "steps": 0, "curve": []}, schedule_minutes=ab.minutes)["supervised"]
    state = {"model": tr.model.state_dict(), "opt": tr.stepper.optimizer.state_dict(),
             "batch": tr.stepper.batch_gen.get_state()}
    for a in arms.values():
        a.model.load_state_dict(state["model"])
        a.stepper.optimizer.load_state_dict(copy.deepcopy(state["opt"]))
        a.stepper.batch_gen.set_state(state["batch"])
    return {"used": res["seconds"], "steps": res["steps"], "curve": res["curve"]}


def train_for_budget(arms, stages, ab, seed, start, schedule_minutes=None, sched=None):
    """Alternate the arms by wall time until each has used the budget (lr over schedule_minutes)."""
    budget, schedule = ab.minutes * 60, (schedule_minutes or ab.minutes) * 60
    used = {a: start["used"] for a in arms}
    steps = {a: start["steps"] for a in arms}
    sp_rows = {a: [] for a in arms}
    sp_time = {a: 0.0 for a in arms}
    curve = {a: list(start["curve"]) for a in arms}
    next_log = time.perf_counter() + 60
    recent, stalls = {}, {a: 0 for a in arms}

    def charge(a, kind, dt):
        """Seconds to charge for a step. The shared machine sometimes freezes our process for
        minutes; a step 10x slower than the median of its kind is a stall, charged the median."""
        past = recent.setdefault((a, kind), [])
        med = float(np.median(past[-50:])) if len(past) >= 5 else None
        if med is not None and dt > max(2.0, 10 * med):
            stalls[a] += 1
            log(seed, f"stall: a {kind} step of {a} took {dt:.1f} s (median {med:.2f} s); charged the median")
            return med
        past.append(dt)
        return dt
    while min(used.values()) < budget:
        a = min(used, key=used.get)
        tr, stage, frac = arms[a], stages[a], used[a] / schedule
        if ab.curve and len(curve[a]) < int(frac * ab.curve):  # untimed
            curve[a].append([round(frac, 3), steps[a], tr.evaluate(64)["val_bpb"]])
        tr.step = min(SCHEDULE_STEPS - 1, int(SCHEDULE_STEPS * frac))
        t0 = time.perf_counter()
        kind = "sup"
        every, sp_start = (sched or {}).get(a, (0, 0))
        if every and frac >= sp_start and steps[a] % every == every - 1:
            kind = "sp"
            tr.stepper.set_lr(lr_share(tr.step, tr.tc))
            sp_rows[a].append(stage.step())
            sp_time[a] += time.perf_counter() - t0
        else:
            tr.stepper.train_step(lr_share(tr.step, tr.tc))
        steps[a] += 1
        used[a] += charge(a, kind, time.perf_counter() - t0)
        if time.perf_counter() > next_log:
            next_log = time.perf_counter() + 60
            log(seed, " ".join(f"{k}: {steps[k]} steps {used[k]:.0f}s" for k in arms))
    out = {}
    for a in arms:
        n_sp = len(sp_rows[a])
        sup_s = (used[a] - start["used"] - sp_time[a]) / max(1, steps[a] - start["steps"] - n_sp)
        out[a] = {"seconds": round(used[a], 1), "steps": steps[a], "selfplay_steps": n_sp, "stalls": stalls[a],
                  "s_per_sup_step": round(sup_s, 4),
                  "s_per_sp_step": round(sp_time[a] / n_sp, 4) if n_sp else None,
                  "curve": curve[a], **trend(sp_rows[a])}
    return out


def trend(rows):
    """Self-play numbers, mean over the first and the last quarter of its steps."""
    q = len(rows) // 4
    if not q:
        return {}
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r if k != "example"):  # some keys (buffer picks) are not in every row
        first = [r[k] for r in rows[:q] if k in r]
        last = [r[k] for r in rows[-q:] if k in r]
        if first and last:
            out[f"sp_{k}"] = [round(float(np.mean(first)), 4), round(float(np.mean(last)), 4)]
    return out


# ----------------------------------------------------------------------------- evaluation


def heldout_tasks(tr, ab):
    """Evenly spaced val windows: prompts (N, P) and the real next gen_tokens tokens (N, G)."""
    data, P, G = tr.data["val"], ab.prompt_tokens, ab.gen_tokens
    starts = np.linspace(0, len(data) - P - G - 1, ab.prompts).astype(np.int64)
    rows = windows(data, starts, P + G)
    return rows[:, :P], rows[:, P:]


def text_rates(rows, train_grams):
    return {"seq_rep_4": float(np.mean([seq_rep_n(r, 4) for r in rows])),
            "loop_rate": float(np.mean([has_loop(r, 8) for r in rows])),
            "distinct_2": float(np.mean([distinct_n(r, 2) for r in rows])),
            "copy_rate": copy_rate(rows, train_grams[0]),
            "rare_rate": float(np.mean(train_grams[1][np.concatenate(rows)] < 5))}


def real_rates(tasks, train_grams):
    return text_rates(tasks[1].tolist(), train_grams)


def evaluate_arm(tr, tok, tasks, train_grams, ab, seed):
    prompts, _ = tasks
    res = {"val_bpb": tr.evaluate(max_windows=10**9)["val_bpb"]}
    for mode, t in (("greedy", 0.0), ("t08", 0.8)):
        gen = torch.Generator().manual_seed(10_000 + seed)  # the same draws in every arm
        with autocast(tr.device, tr.precision):
            outs = rollouts(tr.model, prompts, ab.gen_tokens, t, gen).tolist()
        res.update({f"{mode}_{k}": v for k, v in text_rates(outs, train_grams).items()})
        res[f"{mode}_examples"] = [tok.decode(o) for o in outs[:4]]
    return res


def has_loop(tokens, n=8):
    """A loop: some n-gram starting in the second half of `tokens` already occurred earlier."""
    seen, half = set(), len(tokens) // 2
    for i, g in enumerate(ngrams(tokens, n)):
        if i >= half and g in seen:
            return True
        seen.add(g)
    return False


def ngram_hashes(tokens, n):
    """(len - n + 1,) uint64 hashes of every n-gram of a token sequence (polynomial, wrapping)."""
    t = np.asarray(tokens, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + t[j:len(t) - n + 1 + j]
    return h


def copy_rate(rows, train_grams, n=8):
    """Share of the n-grams of all rows that occur verbatim in the train split."""
    h = np.concatenate([ngram_hashes(r, n) for r in rows])
    return float(np.isin(h, train_grams).mean())


def log(seed, msg):
    print(f"[seed {seed} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the table

METRICS = ["val_bpb"] + [f"{m}_{k}" for m in ("greedy", "t08") for k in ("seq_rep_4", "loop_rate", "distinct_2",
                                                                         "copy_rate", "rare_rate")]


def table(out):
    seeds = out["seeds"]
    arms = list(seeds[0]["arms"])
    base = "supervised"
    head = "| metric | real text | " + " | ".join(arms) + " | " + " | ".join(f"Δ {a} (paired)" for a in arms if a != base) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(arms) - 1)]
    for k in ["steps", "selfplay_steps", "decay_step", "plateau_step", "kept_step", "seconds", "s_per_sup_step", "s_per_sp_step"] + METRICS:
        real = next((f"{np.mean([s['real'][r] for s in seeds]):.4f}" for r in seeds[0]["real"] if k.endswith(r)), "")
        vals = {a: [s["arms"][a].get(k) for s in seeds] for a in arms}
        cells = [pm(vals[a]) for a in arms]
        deltas = [pm([y - x for x, y in zip(vals[base], vals[a])]) if None not in vals[a] + vals[base] else "-"
                  for a in arms if a != base]
        lines.append(f"| {k} | {real} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    for a in arms:
        if a == base:
            continue
        ratio = {k: [s["arms"][a][k] / s["arms"][base][k] if s["arms"][base][k] else None for s in seeds]
                 for k in ("val_bpb", "greedy_loop_rate", "greedy_seq_rep_4", "greedy_copy_rate")}
        lines.append("")
        lines.append(f"{a} / supervised (per seed, then mean ± std; - where supervised is 0): " +
                     ", ".join(f"{k} {pm(v)}" for k, v in ratio.items()))
    return "\n".join(lines)


def pm(xs):
    if any(x is None for x in xs):
        return "-"
    xs = np.asarray(xs, dtype=np.float64)
    sd = xs.std(ddof=1) if len(xs) > 1 else 0.0
    fmt = ".0f" if abs(xs.mean()) >= 100 or np.all(xs == np.round(xs)) else ".4f"
    return f"{xs.mean():{fmt}} ± {sd:{fmt}}"


if __name__ == "__main__":
    sys.exit(main())
