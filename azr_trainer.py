"""The training loop: supervised next-token steps, optional self-play steps, evaluation,
checkpoints and exact resume.

One supervised step: sample B random windows of T+1 tokens from the book, predict tokens 1..T
from 0..T-1, cross-entropy, backward, clip the gradient norm to 1, AdamW step. The learning rate
warms up linearly (Adam's moment estimates are noisy in the first steps) and then follows a
cosine down to a tenth of its peak (Loshchilov & Hutter 2017).

Every `selfplay_every` supervised steps, one self-play step (selfplay.py) lets the model learn
from rewards on its own generations. Every `eval_every` steps we measure the validation loss in
**bits per byte**: total cross-entropy in bits over the bytes of text it covers. Unlike
per-token loss it does not depend on the tokenizer, so models with different vocabularies compare.

Exact resume: a checkpoint holds everything the future depends on — weights, AdamW moments,
step, the batch sampler's RNG, the global RNG (dropout) — so stopping at step k and resuming
reproduces the uninterrupted run's loss at every later step, bit for bit (tested).
"""

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from hardware import autocast, pick_device, pick_precision
from model import flops_per_token
from lora import LoRAConfig, attach_lora, count_params, load_lora_state, lora_state, save_adapter
from store import (CorruptFile, Exists, NotFound, StoreError, atomic_write, check_name, load_tensors, load_weights,
                   save_tensors, weights_of, write_json)
from tokenizer import Tokenizer, prepare_tokens


# "auto" compiles a CPU run whose matmul work is at least this many FLOPs: about a minute of
# eager training on 2 cores, enough to win back ~20 s of compiling (~8 s from inductor's cache)
COMPILE_MIN_FLOPS = 5e12


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 0  # 0 = the model's max_seq_len
    # peak lr 5e-4, batch 16, warm-up 50, full context: the best val bits/byte of the small preset
    # on tinyshakespeare after 5 minutes (`python bench.py quality --sweep`, BENCHMARKS.md): lr
    # 3e-4 / 5e-4 / 1e-3 / 2e-3 gave 1.946 / 1.913 / 1.929 / 1.950; batch 8 / 32 1.942 / 1.914
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: str = "auto"  # auto | on | off: torch.compile the training forward (auto: long runs, see use_compile)
    selfplay_every: int = 0  # 0 = self-play off
    keep_best: bool = True  # finish with the weights of the best evaluation (early stopping)
    val_fraction: float = 0.1

    def validate(self):
        checks = [
            (1 <= self.steps <= 10_000_000, "steps must be between 1 and 10,000,000"),
            (1 <= self.batch_size <= 4096, "batch_size must be between 1 and 4096"),
            (0 <= self.seq_len <= 8192, "seq_len must be between 0 (= max_seq_len) and 8192"),
            (0 < self.learning_rate <= 1, "learning_rate must be in (0, 1]; try 5e-4"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (0 <= self.weight_decay <= 1, "weight_decay must be in [0, 1]"),
            (0 < self.grad_clip, "grad_clip must be > 0"),
            (1 <= self.grad_accum <= 1024, "grad_accum must be between 1 and 1024"),
            (1 <= self.eval_every, "eval_every must be >= 1"),
            (1 <= self.eval_batches <= 1000, "eval_batches must be between 1 and 1000"),
            (1 <= self.checkpoint_every, "checkpoint_every must be >= 1"),
            (1 <= self.keep_checkpoints <= 100, "keep_checkpoints must be between 1 and 100"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "precision must be auto, fp32, bf16 or fp16"),
            (self.compile in ("auto", "on", "off"), "compile must be auto, on or off"),
            (0 <= self.selfplay_every <= 100_000, "selfplay_every must be >= 0 (0 = off)"),
            (0.01 <= self.val_fraction <= 0.5, "val_fraction must be between 0.01 and 0.5"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown training options: {sorted(set(d) - known)}")
        return cls(**d).validate()


# ----------------------------------------------------------------------------- entry points


def train(store, name, books, tc, on_event=None, should_stop=None):
    """Start a new run of `tc.steps` steps on `books` (names or paths). Returns a summary."""
    tc.validate()
    run = {"run_id": uuid.uuid4().hex[:8], "books": list(books), "config": asdict(tc), "status": "running",
           "base_steps": store.lineage(name)["steps"], "started": time.time()}
    for old in store.checkpoint_dir(name).glob("*.safetensors"):  # the previous run's: never resumable now
        old.unlink()
    trainer = Trainer(store, name, run)
    return trainer.run(on_event, should_stop)


def finetune(store, name, books, tc, adapter, lc=None, on_event=None, should_stop=None):
    """LoRA fine-tuning (lora.py) of model `name` on `books`: the base stays frozen, in NF4 if
    lc.nf4 (QLoRA), and reuses its tokenizer; only the adapter trains. The run saves
    models/<name>/adapters/<adapter>/ and leaves the base model untouched. Returns a summary."""
    tc.validate()
    lc = (lc or LoRAConfig()).validate()
    check_name(adapter, "adapter")
    if store.tokenizer(name) is None:
        raise StoreError(f"model {name!r} has no tokenizer yet: train it on a book before fine-tuning it")
    if adapter in store.list_adapters(name):
        raise Exists(f"model {name!r} already has an adapter {adapter!r}; resume it or pick another name")
    shutil.rmtree(run_dir(store, name, adapter), ignore_errors=True)  # leftovers of a failed attempt
    run = {"run_id": uuid.uuid4().hex[:8], "books": list(books), "config": asdict(tc), "status": "running",
           "base_steps": 0, "started": time.time(), "adapter": adapter, "lora": lc.to_dict(),
           "base_sha256": store.weights_sha256(name)}
    return Trainer(store, name, run).run(on_event, should_stop)


def resume(store, name, on_event=None, should_stop=None, adapter=None):
    """Continue the last unfinished run of `name` (or of its adapter) from its newest good checkpoint."""
    path = run_dir(store, name, adapter) / "run.json"
    what = f"adapter {adapter!r} of {name!r}" if adapter else f"model {name!r}"
    if not path.exists():
        raise NotFound(f"{what} has no run to resume; start one with train or finetune")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptFile(f"{path} is damaged ({e}); this run cannot resume: start a new one with train") from e
    if run["status"] == "done":
        raise StoreError(f"the last run of {what} finished; start a new one")
    if adapter and store.weights_sha256(name) != run["base_sha256"]:
        raise StoreError(f"model {name!r} has other weights than when adapter {adapter!r} started; it cannot resume")
    trainer = Trainer(store, name, run)
    restored = trainer.restore_latest()
    if restored["skipped"] and on_event:  # say why steps are redone: the newest checkpoint was bad
        on_event({"type": "warning", "message": f"skipped damaged checkpoints ({'; '.join(restored['skipped'])}); "
                                                f"resuming from {restored['path']} (step {restored['step']})"})
    return trainer.run(on_event, should_stop)


def run_dir(store, name, adapter=None):
    """Where a run keeps run.json and checkpoints; a fine-tune's sit under its base model's."""
    d = store.checkpoint_dir(name)
    return d / "adapters" / check_name(adapter, "adapter") if adapter else d


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, store, name, run):
        self.store, self.name, self.run_info = store, name, run
        self.tc = tc = TrainConfig.from_dict(run["config"])
        self.device = pick_device(tc.device)
        self.precision = pick_precision(self.device, tc.precision)
        self.model = store.load_model(name, self.device)
        self.adapter = run.get("adapter")  # a fine-tune trains only this LoRA adapter
        if self.adapter:
            self.lc = LoRAConfig.from_dict(run["lora"])
            torch.manual_seed(tc.seed)  # the same seed gives the same initial A
            compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
            attach_lora(self.model, self.lc, compute)
        self.params = count_params(self.model)
        self.cfg = self.model.config
        self.T = min(tc.seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.tok, self.data, self.book_refs = load_books(store, name, run["books"], tc.val_fraction)
        short = min(len(d) for d in self.data.values())
        if short <= self.T + 1:
            raise StoreError(f"the book is too short: its validation split has {short} tokens but one "
                             f"window needs {self.T + 1}; give a longer book or a smaller seq_len")
        self.byte_len = torch.from_numpy(self.tok.byte_lengths())
        self.optimizer = make_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.forward, self.compile_note = self._compile()
        self.step = 0
        torch.manual_seed(tc.seed)  # dropout noise; restored from checkpoints on resume
        self.batch_gen = torch.Generator().manual_seed(tc.seed)
        self.selfplay = None
        if tc.selfplay_every:
            from selfplay import SelfPlay  # only needed when the stage is on
            self.selfplay = SelfPlay(self)
        self.ckpt_dir = run_dir(store, name, self.adapter)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        out_dir = store.adapter_dir(name, self.adapter, must_exist=False) if self.adapter else store.model_dir(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        self.best_bpb = None if self.adapter else store.lineage(name)["best_val_bpb"]
        self.run_best = None  # [val_bpb, step] of this run's best evaluation

    # data ----------------------------------------------------------------------
    def get_batch(self, split="train"):
        """B random windows -> x, y (B, T): y is x shifted left by one token."""
        data = self.data[split]
        ix = torch.randint(len(data) - self.T - 1, (self.tc.batch_size,), generator=self.batch_gen).numpy()
        rows = data[ix[:, None] + np.arange(self.T + 1)].astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    # the loop ------------------------------------------------------------------
    def run(self, on_event=None, should_stop=None):
        emit = on_event or (lambda e: None)
        tc = self.tc
        self._write_run("running")
        metrics = open(self.metrics_path, "a", encoding="utf-8")
        emit({"type": "start", "step": self.step, "total": tc.steps, "device": str(self.device),
              "precision": self.precision, "tokens": {s: len(d) for s, d in self.data.items()},
              "params": self.params, "run_id": self.run_info["run_id"], "compiled": self.forward is not self.model})
        if self.compile_note:
            emit({"type": "warning", "message": self.compile_note})
        t_start, step_start = time.time(), self.step
        status = "done"
        try:
            while self.step < tc.steps:
                if should_stop and should_stop():
                    status = "stopped"
                    self.save_checkpoint()
                    break
                t0 = time.time()
                row = self.train_step()
                self.step += 1
                dt = time.time() - t0
                row.update(run=self.run_info["run_id"], step=self.step, time=round(time.time(), 3),
                           tokens_per_s=round(tc.batch_size * tc.grad_accum * self.T / dt, 1))
                if self.selfplay and self.step % tc.selfplay_every == 0:
                    row["selfplay"] = self.selfplay.step()
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    row.update(self.evaluate())
                    self.best_bpb = min(self.best_bpb or math.inf, row["val_bpb"])
                    self._track_best(row["val_bpb"])
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                done = self.step - step_start
                row["eta_s"] = round((time.time() - t_start) / done * (tc.steps - self.step), 1)
                emit({"type": "step", "total": tc.steps, **row})
                if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save_checkpoint()
            self._finish(status)  # inside the try: a full disk here fails the run like any other error
        except Exception as e:
            self._write_run("failed", error=str(e))
            emit({"type": "failed", "step": self.step, "error": str(e)})
            raise
        finally:
            metrics.close()
        emit({"type": status, "step": self.step, "total": tc.steps, "best_val_bpb": self.best_bpb})
        return self.summary(status)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns {loss, lr, grad_norm}."""
        model, tc = self.model, self.tc
        model.train()
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(tc.grad_accum):
            x, y = self.get_batch("train")
            with autocast(self.device, self.precision):
                _, loss = self.forward(x, y)
            self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item() / tc.grad_accum
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": round(total, 5), "lr": lr, "grad_norm": round(norm.item(), 4)}

    def _compile(self):
        """-> (forward, note): torch.compile'd model when use_compile says it pays, else the model.
        Compilation happens at the first call, so make that call now, forward and backward on a
        dummy batch: if it fails (no C++ compiler, an op the compiler cannot handle), train eagerly
        and say why. Evaluation and self-play use the eager model: other shapes, no recompiles."""
        tc = self.tc
        run_flops = tc.steps * tc.grad_accum * tc.batch_size * self.T * flops_per_token(self.cfg, self.T)
        if not use_compile(tc, self.device, run_flops):
            return self.model, None
        compiled = torch.compile(self.model)
        x = torch.zeros(tc.batch_size, self.T, dtype=torch.long, device=self.device)
        self.model.train()
        try:
            with autocast(self.device, self.precision):
                _, loss = compiled(x, x)
            loss.backward()
        except Exception as e:  # any failure of the compiler means: run without it
            return self.model, f"torch.compile failed, training without it: {str(e).strip()[:300]}"
        finally:
            self.model.zero_grad(set_to_none=True)
        return compiled, None

    @torch.no_grad()
    def evaluate(self, max_windows=None):
        """Loss, perplexity and bits/byte on fixed, evenly spaced windows of the val split."""
        n = max_windows or self.tc.eval_batches * self.tc.batch_size
        return evaluate_bpb(self.model, self.data["val"], self.byte_len, self.T, n, self.device, self.precision)

    # checkpoints ---------------------------------------------------------------
    def save_checkpoint(self):
        """model + AdamW state + RNGs + step, in one safetensors file, written atomically."""
        tensors = {f"model.{k}": v for k, v in self._model_tensors().items()}
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batch"] = self.batch_gen.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.step, "run_id": self.run_info["run_id"], "scaler": self.scaler.state_dict(),
                "param_groups": opt["param_groups"], "best_val_bpb": self.best_bpb,
                "run_best": self.run_best}
        if self.selfplay:
            sp_tensors, meta["selfplay"] = self.selfplay.state()
            tensors.update({f"selfplay.{k}": v for k, v in sp_tensors.items()})
        save_tensors(self.ckpt_dir / f"step_{self.step:08d}.safetensors", tensors, meta)
        for old in sorted(self.ckpt_dir.glob("step_*.safetensors"))[: -self.tc.keep_checkpoints]:
            old.unlink()
        for torn in self.ckpt_dir.glob(".step_*.tmp*"):  # left by a kill -9 mid-write: never valid
            torn.unlink(missing_ok=True)
        self._write_run(self.run_info["status"])

    def restore_latest(self):
        """Load the newest checkpoint that passes its checksum, falling back to older ones."""
        errors = []
        for path in sorted(self.ckpt_dir.glob("step_*.safetensors"), reverse=True):
            try:
                tensors, meta = load_tensors(path)
            except CorruptFile as e:
                errors.append(str(e))
                continue
            if meta.get("run_id") != self.run_info["run_id"]:
                continue  # another run's file: resuming from it would mix two runs
            self._restore(tensors, meta)
            return {"step": self.step, "path": path.name, "skipped": errors}
        if errors:
            raise CorruptFile("every checkpoint is damaged: " + "; ".join(errors))
        self._truncate_metrics()  # cut off before the first checkpoint: redo the run from step 0
        return {"step": 0, "path": None, "skipped": []}

    def _restore(self, tensors, meta):
        self._load_model_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v.to(self.device) if key != "step" else v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.batch_gen.set_state(tensors["rng.batch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.best_bpb, self.run_best = meta["step"], meta["best_val_bpb"], meta.get("run_best")
        if self.selfplay and "selfplay" in meta:
            self.selfplay.load_state({k[9:]: v for k, v in tensors.items() if k.startswith("selfplay.")}, meta["selfplay"])
        self._truncate_metrics()

    def _truncate_metrics(self):
        """Drop this run's metric lines past the restored step: the resumed run rewrites them."""
        path = self.metrics_path
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if not (row.get("run") == self.run_info["run_id"] and row.get("step", 0) > self.step):
                keep.append(line)
        atomic_write(path, "".join(line + "\n" for line in keep))

    # bookkeeping -----------------------------------------------------------------
    def _write_run(self, status, **extra):
        self.run_info.update(status=status, step=self.step, **extra)
        write_json(self.ckpt_dir / "run.json", self.run_info)

    def _model_tensors(self):
        # a fine-tune's checkpoint holds only the adapter: the base is frozen and stays in the store
        return lora_state(self.model) if self.adapter else weights_of(self.model)

    def _load_model_tensors(self, tensors):
        (load_lora_state if self.adapter else load_weights)(self.model, tensors)

    def _track_best(self, val_bpb):
        """Keep the weights of this run's best evaluation on disk. A small book is memorised after
        a few hundred steps and val loss climbs again (measured: the example book's val bits/byte
        bottoms out near step 200-300 of 1000), so a finished run ends on its best weights."""
        if self.tc.keep_best and (self.run_best is None or val_bpb < self.run_best[0]):
            self.run_best = [val_bpb, self.step]
            save_tensors(self.ckpt_dir / "best.safetensors", self._model_tensors(), {"step": self.step})

    def _restore_best(self):
        """At the end of a run: go back to the best evaluation's weights if the last is worse."""
        if self.tc.keep_best and self.run_best and self.run_best[1] != self.step:
            tensors, _ = load_tensors(self.ckpt_dir / "best.safetensors")
            self._load_model_tensors(tensors)

    def _finish(self, status):
        """Save the weights as the model's current state and record the run in its lineage."""
        if status == "done":
            self._restore_best()
        if self.adapter:
            return self._finish_adapter(status)
        self.store.save_weights(self.name, self.model)
        lin = self.store.lineage(self.name)
        runs = [r for r in lin["runs"] if r["run_id"] != self.run_info["run_id"]]
        runs.append({"run_id": self.run_info["run_id"], "books": self.book_refs, "steps": self.step,
                     "status": status, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "selfplay_every": self.tc.selfplay_every, "best": self.run_best})
        known = {b["sha256"] for b in lin["books"]}
        books = lin["books"] + [b for b in self.book_refs if b["sha256"] not in known]
        self.store.update_lineage(self.name, runs=runs, books=books, best_val_bpb=self.best_bpb,
                                  steps=self.run_info["base_steps"] + self.step)
        if status == "done":
            self.store.save_version(self.name, note=f"run {self.run_info['run_id']}: {self.step} steps")
        self._write_run(status)

    def _finish_adapter(self, status):
        """A fine-tune saves its adapter (also when stopped: it is usable, and resume continues it)."""
        record = {"run_id": self.run_info["run_id"], "books": self.book_refs, "steps": self.step, "status": status,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "best_val_bpb": self.best_bpb, "best": self.run_best}
        save_adapter(self.store, self.name, self.adapter, self.model, self.lc, self.run_info["base_sha256"], record)
        self._write_run(status)

    def summary(self, status):
        return {"status": status, "step": self.step, "total": self.tc.steps, "best_val_bpb": self.best_bpb,
                "device": str(self.device), "precision": self.precision, "params": self.params,
                "adapter": self.adapter, "best": self.run_best}


# ----------------------------------------------------------------------------- pieces


def lr_at(step, tc):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the last step."""
    peak, floor = tc.learning_rate, tc.learning_rate * tc.min_lr_ratio
    if step < tc.warmup_steps:
        return peak * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, tc):
    """AdamW with weight decay on matrices only: decaying biases and LayerNorm gains pulls them
    towards 0, which only hurts (they are few and do not overfit)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per tensor for the whole update instead of ~10 elementwise ops, each a
    # pass over memory; on 2 EPYC cores the update takes 0.8 instead of 2.4 ms (small preset),
    # 3.4 instead of 11.4 ms (medium), 1-4% of a training step
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def use_compile(tc, device, run_flops):
    """Whether to torch.compile the training forward. "auto" compiles on CPU, where it was
    measured (BENCHMARKS.md: 1.2x fp32, 2.1x bf16 train tokens/s on 2 EPYC cores), for runs long
    enough to win back the compile time, and only with the C++ compiler inductor builds its
    kernels with. On CUDA, ask for it with compile="on"."""
    if tc.compile != "auto":
        return tc.compile == "on"
    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return device.type == "cpu" and has_cxx and run_flops >= COMPILE_MIN_FLOPS


@torch.no_grad()
def evaluate_bpb(model, data, byte_len, T, n_windows, device, precision="fp32", batch_size=16):
    """Cross-entropy over up to n_windows evenly spaced, non-overlapping windows of `data`.
    bits/byte = (sum of losses in nats) / ln 2 / (bytes of text those target tokens spell)."""
    model.eval()
    n_windows = max(1, min(n_windows, (len(data) - 1) // T))
    starts = np.linspace(0, len(data) - T - 1, n_windows).astype(np.int64)
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        rows = torch.from_numpy(data[s[:, None] + np.arange(T + 1)].astype(np.int64)).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        with autocast(device, precision):
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        nats += loss.item()
        n_tokens += y.numel()
        n_bytes += byte_len[y.cpu()].sum().item()
    model.train()
    return {"val_loss": round(nats / n_tokens, 5), "val_ppl": round(math.exp(nats / n_tokens), 3),
            "val_bpb": round(nats / math.log(2) / max(n_bytes, 1), 5)}


def load_books(store, name, books, val_fraction=0.1):
    """Books -> (tokenizer, {train, val} memmaps, [{name, sha256}]). The first run trains the
    model's tokenizer on its books; later runs reuse it (the embeddings are tied to its ids)."""
    if not books:
        raise StoreError("give at least one book to train on")
    resolved = [store.resolve_book(b) for b in books]
    texts = {f"{n}-{sha[:8]}": text for n, text, sha in resolved}
    tok = store.tokenizer(name)
    if tok is None:
        cfg = store.config(name)
        tok = Tokenizer.train(texts.values(), cfg.vocab_size)
        tok.save(store.model_dir(name) / "tokenizer.json")
    data = prepare_tokens(tok, texts, store.home / "cache" / "tokens", val_fraction)
    return tok, data, [{"name": n, "sha256": sha} for n, _, sha in resolved]


def unigram_bpb(data, byte_len):
    """The baseline a model must beat: bits/byte of val under token frequencies counted on
    train (add-one smoothed) — what you get knowing which tokens are common, but no context."""
    V = len(byte_len)
    counts = np.bincount(np.asarray(data["train"]), minlength=V)[:V] + 1.0
    logp = np.log2(counts / counts.sum())
    val = np.asarray(data["val"])
    return float(-logp[val].sum() / byte_len.numpy()[val].sum())
