"""The training loop: supervised next-token steps, optional self-play steps, evaluation,
checkpoints and exact resume.

One supervised step: sample B random windows of T+1 tokens from the book, predict tokens 1..T
from 0..T-1, cross-entropy, backward, clip the gradient norm to 1, AdamW step. The learning rate
warms up linearly (Adam's moment estimates are noisy in the first steps) and then follows a
cosine down to a tenth of its peak (Loshchilov & Hutter 2017).

Every `selfplay_every` supervised steps, one self-play step (selfplay.py) lets the model learn
from its own generations. Every `eval_every` steps we measure the validation loss in **bits per
byte**: total cross-entropy in bits over the bytes of text it covers. Unlike per-token loss it
does not depend on the tokenizer, so models with different vocabularies compare.

Exact resume: a checkpoint holds everything the future depends on — the trained weights, AdamW
moments, step, the batch sampler's RNG, the global RNG (dropout) — so stopping at step k and
resuming reproduces the uninterrupted run's loss at every later step, bit for bit (tested).

The trainer knows a model, its token arrays and a folder for its checkpoints. Where models and
books live on disk is the store's business; runs.py connects the two.
"""

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import torch

import config
import speed
from config import SEED_MAX, setting
from files import CorruptFile, atomic_write, load_tensors, save_tensors, write_json
from hardware import autocast, pick_precision
from sizing import flops_per_token


SAMPLE_PROMPT_MAX_CHARS = 500  # a sample shows how the model continues a line, not a chapter


@dataclass
class TrainConfig:
    steps: int = setting(1000, "optimizer steps", 1, 10_000_000)
    batch_size: int = setting(16, "windows of text per step", 1, 4096)
    seq_len: int = setting(0, "tokens per window (0 = the model's max_seq_len)", 0, 8192)
    # the best val bits/byte of the small preset on tinyshakespeare after 5 minutes (BENCHMARKS.md)
    learning_rate: float = setting(5e-4, "peak learning rate of AdamW", 1e-8, 1.0)
    min_lr_ratio: float = setting(0.1, "the cosine ends at this share of the peak", 0.0, 1.0)
    warmup_steps: int = setting(50, "steps of linear warm-up to the peak", 0, 10_000_000)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only", 0.0, 1.0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this", 1e-6, 1e6)
    grad_accum: int = setting(1, "micro-batches per optimizer step", 1, 1024)
    eval_every: int = setting(100, "steps between evaluations", 1, 10_000_000)
    eval_batches: int = setting(8, "batches of validation windows per evaluation", 1, 1000)
    checkpoint_every: int = setting(100, "steps between checkpoints", 1, 10_000_000)
    keep_checkpoints: int = setting(3, "newest checkpoints kept", 1, 100)
    seed: int = setting(1337, "seed of the batch sampler and dropout", 0, SEED_MAX)
    device: str = setting("auto", "auto (cuda, then mps, then cpu), or a device such as cpu or cuda:1")
    precision: str = setting("auto", "auto picks bf16 only where the hardware has it", choices=("auto", "fp32", "bf16", "fp16"))
    compile: str = setting("auto", "torch.compile the training step (auto: long CPU runs)", choices=("auto", "on", "off"))
    selfplay_every: int = setting(0, "one self-play step after every N supervised steps (0 = off)", 0, 100_000)
    keep_best: bool = setting(True, "finish with the weights of the best evaluation")
    val_fraction: float = setting(0.1, "share of the book held out for validation", 0.01, 0.5)
    sample_tokens: int = setting(32, "at each evaluation, continue the sample prompt by this many tokens (0 = off)", 0, 256)
    sample_prompt: str | None = setting(None, "the prompt of those samples (empty = the book's first line)")

    def validate(self):
        config.validate(self)
        if self.sample_prompt and len(self.sample_prompt) > SAMPLE_PROMPT_MAX_CHARS:
            raise ValueError(f"sample_prompt must be at most {SAMPLE_PROMPT_MAX_CHARS} characters, got {len(self.sample_prompt)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from None
        return self

    @classmethod
    def from_dict(cls, d):
        return config.from_dict(cls, d, "training options")


class Trainer:
    """Trains `model` (already on its device) on data {"train", "val"} (token arrays), with
    checkpoints, run.json and best.safetensors in `ckpt_dir` and one metrics line per step.

    `sample`, if given, turns the model into a short text at each evaluation ({prompt, text}:
    runs.py writes it with the tokenizer, which the trainer does not know); it goes into the
    evaluation's metrics row, so a run's samples show what the model learned step by step."""

    def __init__(self, model, data, byte_len, tc, ckpt_dir, metrics_path, run_info, sample=None):
        self.model, self.data, self.byte_len, self.tc = model, data, byte_len, tc.validate()
        self.sample = sample
        self.ckpt_dir, self.metrics_path, self.run_info = ckpt_dir, metrics_path, run_info
        self.device = next(model.parameters()).device
        self.precision = pick_precision(self.device, tc.precision)
        self.cfg = model.config
        self.T = min(tc.seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        short = min(len(d) for d in data.values())
        if short <= self.T + 1:
            raise ValueError(f"the book is too short: its validation split has {short} tokens but one "
                             f"window needs {self.T + 1}; give a longer book or a smaller seq_len")
        self.optimizer = make_optimizer(model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss = speed.TrainLoss(model)  # replaced by its compiled form when compiling pays
        self.compiled = self.warmed = False
        self.step = 0
        torch.manual_seed(tc.seed)  # dropout noise; restored from checkpoints on resume
        self.batch_gen = torch.Generator().manual_seed(tc.seed)
        self.selfplay = None
        if tc.selfplay_every:
            from selfplay import SelfPlay  # only needed when the stage is on
            self.selfplay = SelfPlay(model, self.get_batch, self.optimizer_step, data["train"], self.precision, tc.seed)
        self.run_best = None  # [val_bpb, step] of this run's best evaluation
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    # data ----------------------------------------------------------------------
    def get_batch(self, split="train"):
        """B random windows -> x, y (B, T): y is x shifted left by one token."""
        data = self.data[split]
        ix = torch.randint(len(data) - self.T - 1, (self.tc.batch_size,), generator=self.batch_gen).numpy()
        rows = data[ix[:, None] + np.arange(self.T + 1)].astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    # the loop ------------------------------------------------------------------
    def run(self, on_event=None, should_stop=None, on_finish=None):
        """Train up to tc.steps. `on_finish(status)` saves the result (runs.py: into the store)
        before run.json says the run is over, so a failure there fails the run. -> a summary."""
        emit = on_event or (lambda e: None)
        tc = self.tc
        self._write_run("running")
        note = self.warm_up()
        metrics = open(self.metrics_path, "a", encoding="utf-8")
        emit({"type": "start", "step": self.step, "total": tc.steps, "device": str(self.device),
              "precision": self.precision, "tokens": {s: len(d) for s, d in self.data.items()},
              "params": self.run_info.get("params"), "run_id": self.run_info["run_id"], "compiled": self.compiled})
        if note:
            emit({"type": "warning", "message": note})
        t_start, step_start = time.time(), self.step
        status = "done"
        try:
            while self.step < tc.steps:
                if should_stop and should_stop():
                    status = "stopped"
                    self.save_checkpoint()
                    break
                row = self._one_step()
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                row["eta_s"] = round((time.time() - t_start) / (self.step - step_start) * (tc.steps - self.step), 1)
                emit({"type": "step", "total": tc.steps, **row})
                if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save_checkpoint()
            if status == "done":
                self._restore_best()
            if on_finish:
                on_finish(status)
            self._write_run(status)
        except Exception as e:  # a full disk in on_finish fails the run like any other error
            self._write_run("failed", error=str(e))
            emit({"type": "failed", "step": self.step, "error": str(e)})
            raise
        finally:
            metrics.close()
        emit({"type": status, "step": self.step, "total": tc.steps, "best": self.run_best})
        return {"status": status, "step": self.step, "total": tc.steps, "best": self.run_best,
                "device": str(self.device), "precision": self.precision, "compiled": self.compiled}

    def _one_step(self):
        """A supervised step, then self-play and evaluation when they are due -> its metrics row."""
        t0 = time.time()
        row = self.train_step()
        self.step += 1
        row.update(run=self.run_info["run_id"], step=self.step, time=round(time.time(), 3),
                   tokens_per_s=round(self.tc.batch_size * self.tc.grad_accum * self.T / (time.time() - t0), 1))
        if self.selfplay and self.step % self.tc.selfplay_every == 0:
            row["selfplay"] = self.selfplay.step()
        if self.step % self.tc.eval_every == 0 or self.step == self.tc.steps:
            row.update(self.evaluate())
            if self.sample:
                row["sample"] = self.sample(self.model)
            self._track_best(row["val_bpb"])
        return row

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns {loss, lr, grad_norm}."""
        tc = self.tc
        self.model.train()
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(tc.grad_accum):
            x, y = self.get_batch("train")
            with autocast(self.device, self.precision):
                loss = self.loss(x, y)
            self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item() / tc.grad_accum
        return {"loss": round(total, 5), "lr": lr, "grad_norm": round(self._apply_gradients(), 4)}

    def optimizer_step(self, loss):
        """Backward of `loss` and one optimizer step; -> the gradient norm before clipping."""
        self.scaler.scale(loss).backward()
        return self._apply_gradients()

    def _apply_gradients(self):
        """Unscale (fp16), clip the gradient norm, step AdamW, zero the gradients."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def warm_up(self):
        """torch.compile the loss when speed.use_compile says it pays (once) -> a note if compiling
        failed. Evaluation and self-play use the eager model: other shapes, no recompiles."""
        tc = self.tc
        run_flops = tc.steps * tc.grad_accum * tc.batch_size * self.T * flops_per_token(self.cfg, self.T)
        if self.warmed or not speed.use_compile(tc.compile, self.device, run_flops):
            return None
        self.warmed = True
        x = torch.zeros(tc.batch_size, self.T, dtype=torch.long, device=self.device)

        def try_step(compiled):
            self.model.train()
            try:
                with autocast(self.device, self.precision):
                    compiled(x, x).backward()
            finally:
                self.model.zero_grad(set_to_none=True)

        self.loss, note = speed.compile_loss(self.loss, self.device, try_step)
        self.compiled = note is None
        return note

    @torch.no_grad()
    def evaluate(self, max_windows=None):
        """Loss, perplexity and bits/byte on fixed, evenly spaced windows of the val split."""
        n = max_windows or self.tc.eval_batches * self.tc.batch_size
        return evaluate_bpb(self.model, self.data["val"], self.byte_len, self.T, n, self.device, self.precision)

    # checkpoints ---------------------------------------------------------------
    def save_checkpoint(self):
        """Trained weights + AdamW state + RNGs + step, in one safetensors file, written atomically."""
        tensors = {f"model.{k}": v for k, v in trained_weights(self.model).items()}
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batch"] = self.batch_gen.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.step, "run_id": self.run_info["run_id"], "scaler": self.scaler.state_dict(),
                "param_groups": opt["param_groups"], "run_best": self.run_best}
        if self.selfplay:
            sp_tensors, meta["selfplay"] = self.selfplay.state()
            tensors.update({f"selfplay.{k}": v for k, v in sp_tensors.items()})
        save_tensors(self.ckpt_dir / f"step_{self.step:08d}.safetensors", tensors, meta)
        for old in sorted(self.ckpt_dir.glob("step_*.safetensors"))[: -self.tc.keep_checkpoints]:
            old.unlink()
        for torn in self.ckpt_dir.glob(".step_*.tmp"):  # left by a kill -9 mid-write: never valid
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
        load_trained_weights(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
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
        self.step, self.run_best = meta["step"], meta.get("run_best")
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

    def _write_run(self, status, **extra):
        self.run_info.update(status=status, step=self.step, **extra)
        write_json(self.ckpt_dir / "run.json", self.run_info)

    def _track_best(self, val_bpb):
        """Keep the weights of this run's best evaluation on disk. A small book is memorised after
        a few hundred steps and val loss climbs again, so a finished run ends on its best weights."""
        if self.run_best is None or val_bpb < self.run_best[0]:
            self.run_best = [val_bpb, self.step]
            if self.tc.keep_best:
                save_tensors(self.ckpt_dir / "best.safetensors", trained_weights(self.model), {"step": self.step})

    def _restore_best(self):
        """At the end of a run: go back to the best evaluation's weights if the last is worse."""
        if self.tc.keep_best and self.run_best and self.run_best[1] != self.step:
            tensors, _ = load_tensors(self.ckpt_dir / "best.safetensors")
            load_trained_weights(self.model, tensors)


# ----------------------------------------------------------------------------- pieces


def new_run(books, tc, **extra):
    """The record of a run (run.json): its id, books, options and status."""
    return {"run_id": uuid.uuid4().hex[:8], "books": list(books), "config": asdict(tc), "status": "running",
            "base_steps": 0, "started": time.time(), **extra}


def trained_weights(model):
    """The tensors a run changes: every parameter that requires a gradient (a fine-tune: only the
    LoRA adapter; the frozen base stays where it came from). A tied weight appears once."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def load_trained_weights(model, tensors):
    """Copy saved tensors (a checkpoint's, an adapter's) into the parameters they came from."""
    own = trained_weights(model)
    if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
        raise CorruptFile("the saved tensors do not fit this model (another config, or an adapter of another rank or targets)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


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
    # fused: one kernel per tensor for the whole update instead of ~10 elementwise passes over memory
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@torch.no_grad()
def evaluate_bpb(model, data, byte_len, T, n_windows, device, precision="fp32", batch_size=16):
    """Cross-entropy over up to n_windows evenly spaced, non-overlapping windows of `data`.
    bits/byte = (sum of losses in nats) / ln 2 / (bytes of text those target tokens spell).
    Leaves the model in the mode (train or eval) it found it in."""
    was_training = model.training
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
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        nats += loss.item()
        n_tokens += y.numel()
        n_bytes += byte_len[y.cpu()].sum().item()
    model.train(was_training)
    return {"val_loss": round(nats / n_tokens, 5), "val_ppl": round(math.exp(nats / n_tokens), 3),
            "val_bpb": round(nats / math.log(2) / max(n_bytes, 1), 5)}


def unigram_bpb(data, byte_len):
    """The baseline a model must beat: bits/byte of val under token frequencies counted on
    train (add-one smoothed) — what you get knowing which tokens are common, but no context."""
    V = len(byte_len)
    counts = np.bincount(np.asarray(data["train"]), minlength=V)[:V] + 1.0
    logp = np.log2(counts / counts.sum())
    val = np.asarray(data["val"])
    return float(-logp[val].sum() / byte_len.numpy()[val].sum())
