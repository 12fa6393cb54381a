"""The training loop: supervised next-token steps, optional self-play steps, evaluation,
checkpoints and exact resume.

One supervised step: sample B random windows of T+1 tokens from the book, predict tokens 1..T
from 0..T-1, cross-entropy, backward, clip the gradient norm to 1, an optimizer step: AdamW, or
Muon (muon.py) for the blocks' matrices with AdamW for the rest. The learning rate warms up
linearly (Adam's moment estimates are noisy in the first steps) and then comes down to a tenth of
its peak: along a cosine (Loshchilov & Hutter 2017), or flat until the run's last stretch and
then in a straight line (warmup-stable-decay, `schedule`).

Self-play (selfplay.py) lets the model learn from its own greedy continuations where they loop.
It begins when supervised learning stops paying: where early stopping would end the run, the run
goes back to its kept weights and goes on with self-play steps only; or, if that never comes, for
the tail of the run from `selfplay_start` on, one self-play step after every `selfplay_every`
supervised steps (selfplay.py's docstring says why). Every `eval_every` steps we measure the validation loss in **bits per
byte**: total cross-entropy in bits over the bytes of text it covers. Unlike per-token loss it
does not depend on the tokenizer, so models with different vocabularies compare.

Exact resume: a checkpoint holds everything the future depends on — the trained weights, the
optimizer's moments (AdamW's, Muon's momentum), step, the batch sampler's RNG, the global RNG
(dropout) — so stopping at step k and resuming reproduces the uninterrupted run's loss at every
later step, bit for bit (tested). A new run leaves the last run's run.json and checkpoints in its
folder until its own first step is done (`_claim`), so a start that fails, or is stopped at once,
costs the last run nothing.

Several processes (torchrun, distributed.py): every rank runs this same loop on its own batches,
and DistributedDataParallel averages the gradients, so one step trains on a global batch of
batch_size x world_size x grad_accum windows; steps and the learning-rate schedule count
optimizer steps, as in one process. The lines that differ are marked `# DDP:`. Rank 0 alone
evaluates and writes (metrics, checkpoints, run.json, the result); a checkpoint holds the RNGs of
every rank, so a resume on as many processes is exact too. Self-play: each rank rolls out its own
contexts, and its update's gradients are averaged by hand (its forward needs logits, so it goes
around the DDP wrapper, which only knows the training loss).

The trainer knows a model, its token arrays and a folder for its checkpoints. Where models and
books live on disk is the store's business; runs.py connects the two.
"""

import collections
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import config
import distributed
import speed
from config import SEED_MAX, setting
from files import CorruptFile, atomic_write, load_tensors, save_tensors, write_json
from hardware import autocast, machine_kind, pick_precision
from muon import Muon
from sizing import flops_per_token


SAMPLE_PROMPT_MAX_CHARS = 500  # a sample shows how the model continues a line, not a chapter
# early stopping counts an evaluation only when val bits/byte is this share above its best (Trainer.early_stop)
STOP_RISE = 0.01
# warmup-stable-decay spends this share of the steps coming down from the peak (Hägele et al. 2024)
WSD_DECAY = 0.2
PACE_STEPS = 100  # a time budget's steps are re-fitted from the time per step of this many recent steps (Budget)


@dataclass
class TrainConfig:
    steps: int = setting(1000, "optimizer steps", 1, 10_000_000)
    # batch 8 at lr 2e-3: twice the steps of batch 16 in the same time, at a peak lr that makes use
    # of them; the best of a sweep of 3-minute budgets on two books (BENCHMARKS.md, "Quality per
    # minute against nanoGPT's CPU recipe")
    batch_size: int = setting(8, "windows of text per step", 1, 4096)
    seq_len: int = setting(0, "tokens per window (0 = the model's max_seq_len)", 0, 8192)
    learning_rate: float = setting(2e-3, "peak learning rate of AdamW (with muon: of the embeddings, gains and biases)",
                                   1e-8, 1.0)
    # muon at 5e-3 with wsd: the best of a 3-minute comparison with AdamW, cosine and muon_lr 1e-2 (BENCHMARKS.md,
    # "Muon and warmup-stable-decay")
    optimizer: str = setting("muon", "adamw, or muon: the blocks' weight matrices take orthogonalised steps, every "
                                     "direction alike (Jordan et al. 2024); AdamW for the rest", choices=("adamw", "muon"))
    muon_lr: float = setting(5e-3, "peak learning rate of Muon's matrices (used with optimizer muon)", 1e-8, 1.0)
    schedule: str = setting("wsd", "after the warm-up: a cosine down to the floor, or wsd: constant, then a "
                                   f"straight line down to the floor over the last {WSD_DECAY * 100:g} percent of the steps",
                            choices=("cosine", "wsd"))
    min_lr_ratio: float = setting(0.1, "the schedule ends at this share of the peak", 0.0, 1.0)
    warmup_steps: int = setting(50, "steps of linear warm-up to the peak", 0, 10_000_000)
    weight_decay: float = setting(0.1, "weight decay (AdamW's and Muon's), on matrices only", 0.0, 1.0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this", 1e-6, 1e6)
    grad_accum: int = setting(1, "micro-batches per optimizer step", 1, 1024)
    eval_every: int = setting(100, "steps between evaluations", 1, 10_000_000)
    eval_batches: int = setting(8, "batches of validation windows per evaluation", 1, 1000)
    checkpoint_every: int = setting(100, "steps between checkpoints", 1, 10_000_000)
    keep_checkpoints: int = setting(3, "newest checkpoints kept", 1, 100)
    seed: int = setting(1337, "seed of the batch sampler and dropout", 0, SEED_MAX)
    device: str = setting("auto", "auto (cuda, then mps, then cpu), or a device such as cpu or cuda:1")
    precision: str = setting("auto", "auto picks bf16 only where the hardware has it", choices=("auto", "fp32", "bf16", "fp16"))
    compile: str = setting("auto", "torch.compile the training step (auto: if a probe of a few steps finds it "
                                   "faster here)", choices=("auto", "on", "off"))
    selfplay_every: int = setting(0, "self-play against greedy loops (0 = off): from selfplay_start on, one self-play "
                                        "step after every N supervised steps; where early stopping would end the run, "
                                        "it goes back to its kept weights and takes self-play steps only. Time with "
                                        "--steps N: a self-play step costs a supervised step's update plus decoding its "
                                        "rollouts token by token; in the tail one comes on top of every "
                                        "selfplay_every-th step, after a plateau they replace the steps left",
                                  0, 100_000)
    selfplay_start: float = setting(0.8, "with self-play on: the share of the steps after which it begins, if no "
                                         "plateau starts it earlier", 0.0, 1.0)
    minutes: float = setting(0.0, "train for this much wall-clock time instead of `steps`: the learning-rate "
                                  "schedule follows the clock and ends with it (0 = off)", 0.0, 1e6)
    patience: int = setting(3, f"stop once val bits/byte has been over {STOP_RISE * 100:g} percent above its best for "
                                f"this many evaluations in a row (0 = never)", 0, 10_000)
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


class StepAbandoned(Exception):
    """Stop came before or in the middle of a step: the step is not taken."""


class Trainer:
    """Trains `model` (already on its device) on data {"train", "val"} (token arrays), with
    checkpoints, run.json and best.safetensors in `ckpt_dir` and one metrics line per step.

    `sample`, if given, turns the model into a short text at each evaluation ({prompt, text}:
    runs.py writes it with the tokenizer, which the trainer does not know); it goes into the
    evaluation's metrics row, so a run's samples show what the model learned step by step."""

    def __init__(self, model, data, byte_len, tc, ckpt_dir, metrics_path, run_info, sample=None, probe_file=None):
        self.model, self.data, self.byte_len, self.tc = model, data, byte_len, tc.validate()
        self.sample = sample
        self.probe_file = probe_file  # compile="auto"'s measurements, per machine and config (a JSON file)
        self.ckpt_dir, self.metrics_path, self.run_info = ckpt_dir, metrics_path, run_info
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            speed.keep_freed_memory()
        self.precision = pick_precision(self.device, tc.precision)
        self.cfg = model.config
        self.T = window_len(tc, self.cfg)
        short = min(len(d) for d in data.values())
        if short <= self.T + 1:
            raise ValueError(f"the book is too short: its validation split has {short} tokens but one "
                             f"window needs {self.T + 1}; give a longer book or a smaller seq_len")
        self.optimizer = make_optimizer(model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # DDP: the wrapped loss module runs the model forward; its backward all-reduces the gradients
        self.loss = distributed.wrap(speed.TrainLoss(model))  # compiled as well when compiling pays
        self.compiled = self.warmed = False
        self.compile_reason = None
        self.step = 0
        self.should_stop = lambda: False  # run() takes the caller's
        torch.manual_seed(tc.seed + distributed.rank())  # DDP: dropout noise, each rank its own; saved in checkpoints
        self.batch_gen = torch.Generator().manual_seed(tc.seed)
        self.selfplay = None
        if tc.selfplay_every:
            from selfplay import SelfPlay  # only needed when the stage is on
            # DDP: each rank proposes and rolls out its own contexts
            self.selfplay = SelfPlay(model, self.optimizer_step, data["train"], self.precision, tc.seed + distributed.rank())
        self.time_share = None  # in a time budget, the share of it spent: the schedule's clock (lr_share)
        self.selfplay_from = None  # the step where a plateau switched the run into self-play steps only
        self.run_best = None  # [val_bpb, step] of this run's best evaluation
        # A new run leaves the folder's last run (run.json, checkpoints) resumable until its own first
        # step is done: a start that fails (a short book, no memory, compiling) destroys nothing
        self.claimed = False
        self.kept = None  # [val_bpb, step, greedy_repeats] of the weights keep-best holds (best.safetensors)
        self.stale_evals = 0  # evaluations in a row clearly above the best one: early stopping (patience)
        if distributed.is_main():  # DDP: the others never write
            ckpt_dir.mkdir(parents=True, exist_ok=True)

    # data ----------------------------------------------------------------------
    def get_batch(self, split="train"):
        """B random windows -> x, y (B, T): y is x shifted left by one token. DDP: every rank draws
        the starts of the whole global batch from the same generator and keeps its own B of them,
        so the ranks see different windows, and together the ones one process would draw."""
        data, B, r = self.data[split], self.tc.batch_size, distributed.rank()
        starts = torch.randint(len(data) - self.T - 1, (B * distributed.world_size(),), generator=self.batch_gen)
        ix = starts[r * B:(r + 1) * B].numpy()
        rows = data[ix[:, None] + np.arange(self.T + 1)].astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    # the loop ------------------------------------------------------------------
    def run(self, on_event=None, should_stop=None, on_finish=None):
        """Train up to tc.steps. `on_finish(status)` saves the result (runs.py: into the store)
        before run.json says the run is over, so a failure there fails the run. -> a summary.
        `should_stop` (the web app's Stop) must answer alike on every rank; the CLI passes none."""
        emit = on_event or (lambda e: None)
        self.should_stop = should_stop or self.should_stop
        main = distributed.is_main()  # DDP: rank 0 writes; the others only train
        tc = self.tc
        self._write_run("running", world_size=distributed.world_size())
        note = self.warm_up()
        metrics = open(self.metrics_path if main else os.devnull, "a", encoding="utf-8")
        emit({"type": "start", "step": self.step, "total": tc.steps, "device": str(self.device),
              "precision": self.precision, "tokens": {s: len(d) for s, d in self.data.items()},
              "params": self.run_info.get("params"), "run_id": self.run_info["run_id"], "compiled": self.compiled,
              "compile_reason": self.compile_reason})
        if note:
            emit({"type": "warning", "message": note})
        t_start, step_start = time.time(), self.step
        budget = Budget(tc.minutes, self.run_info, self.step) if tc.minutes else None
        status = "done"
        end_reason = "budget" if budget else "steps"  # why the run ended, for the page: or early_stop, stopped
        try:
            while self.step < self.tc.steps:
                if budget:  # DDP: rank 0's clock, so that every rank steps at the same learning rate
                    self.time_share = distributed.broadcast(budget.share())
                try:
                    if self.should_stop():
                        raise StepAbandoned
                    row = self._one_step()
                except StepAbandoned:  # Stop, before or in the middle of a step: resume redoes it
                    status = end_reason = "stopped"
                    if self.claimed:  # stopped before its first step: the last run stays the one to resume
                        self.save_checkpoint()
                    break
                if budget and distributed.broadcast(budget.over()):  # time is up (rank 0's clock): end evaluated
                    self.tc = replace(self.tc, steps=self.step)
                    if "val_bpb" not in row and distributed.is_main():
                        row.update(self.evaluate())
                        if "val_bpb" in row:
                            self._track_best(row["val_bpb"], row.get("greedy_repeats"))
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if budget:
                    self.tc = replace(self.tc, steps=distributed.broadcast(budget.fit(self.step, self.tc.steps)))
                row["eta_s"] = round((time.time() - t_start) / (self.step - step_start) * (self.tc.steps - self.step), 1)
                clock = {"elapsed_s": round(budget.elapsed(), 1), "budget_s": budget.seconds} if budget else {}
                emit({"type": "step", "total": self.tc.steps, **row, **clock})
                if self._evaluated(self.step) and distributed.broadcast(self.early_stop()):
                    if self.selfplay and self.selfplay_from is None:  # a plateau: self-play instead of the end
                        self.switch_to_selfplay()
                        emit({"type": "info", "message": f"plateau at step {self.step}: back to the weights of step "
                                                         f"{self.kept[1]}, self-play steps from here on"})
                        self.save_checkpoint()  # a resume must not replay the switch: best.safetensors moves on
                        continue
                    emit({"type": "info", "message": f"early stop at step {self.step}: val bits/byte has been more than "
                                                     f"{STOP_RISE:.0%} above its best for {tc.patience} evaluations (best "
                                                     f"{self.run_best[0]:.4f} at step {self.run_best[1]})"})
                    end_reason = "early_stop"
                    break
                if self.step % tc.checkpoint_every == 0 and self.step < self.tc.steps:
                    self.save_checkpoint()
            if main and status == "done":
                self._restore_best()
            if main and on_finish:
                on_finish(status)
            self._write_run(status)
            distributed.barrier()  # DDP: the job ends when rank 0 has saved the result
        except Exception as e:  # a full disk in on_finish fails the run like any other error
            self._write_run("failed", error=str(e))
            emit({"type": "failed", "step": self.step, "error": str(e)})
            raise
        finally:
            metrics.close()
        emit({"type": status, "step": self.step, "total": self.tc.steps, "best": self.run_best,
              "end_reason": end_reason})
        return {"status": status, "end_reason": end_reason, "step": self.step, "total": self.tc.steps,
                "best": self.run_best, "device": str(self.device), "precision": self.precision,
                "compiled": self.compiled}

    def _one_step(self):
        """A supervised step, then self-play and evaluation when they are due -> its metrics row.
        After a plateau the step is a self-play step alone (its row has no supervised loss)."""
        t0 = time.time()
        if self.selfplay_from is None:
            row = self.train_step()
        else:
            row = {"lr": self._set_lr(), "selfplay": self.selfplay.step()}
        self.step += 1
        if not self.claimed:
            self._claim()
        tokens = self.tc.batch_size * distributed.world_size() * self.tc.grad_accum * self.T  # the global batch
        row.update(run=self.run_info["run_id"], step=self.step, time=round(time.time(), 3),
                   tokens_per_s=round(tokens / (time.time() - t0), 1))
        if self.selfplay_from is None and selfplay_due(self.step, self.tc):
            row["selfplay"] = self.selfplay.step()
        if self._evaluated(self.step) and distributed.is_main():  # DDP: the others wait at the next step's all-reduce
            row.update(self.evaluate())
            if "val_bpb" in row:  # else Stop cut the evaluation short: the step stands, unscored
                if self.sample:
                    row["sample"] = self.sample(self.model)
                self._track_best(row["val_bpb"], row.get("greedy_repeats"))
        return row

    def switch_to_selfplay(self):
        """The plateau: supervised steps stopped paying. Go back to the kept weights (every rank:
        rank 0 reads them and sends them) and go on with self-play steps; the early-stopping count
        starts again, so a self-play phase that costs likelihood ends the run as a plateau would."""
        self.selfplay_from, self.stale_evals = self.step, 0
        if self.tc.keep_best:
            best = load_tensors(self.ckpt_dir / "best.safetensors")[0] if distributed.is_main() else None
            load_trained_weights(self.model, distributed.broadcast(best))
        self.kept = distributed.broadcast(self.kept)

    def _evaluated(self, step):
        return step % self.tc.eval_every == 0 or step == self.tc.steps

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns {loss, lr, grad_norm}.
        Stop is checked before each micro-batch: a step of many can take minutes. A step stopped
        half-way is dropped (StepAbandoned) as if it never began: its gradients are zeroed and the
        RNGs set back, so the resumed run draws the same batches the whole step would have."""
        tc = self.tc
        self.model.train()
        lr = self._set_lr()
        total, rngs = 0.0, self._rng_state()
        for i in range(tc.grad_accum):
            if i and self.should_stop():
                self.optimizer.zero_grad(set_to_none=True)
                self._set_rng_state(rngs)
                raise StepAbandoned
            x, y = self.get_batch("train")
            with distributed.no_sync(self.loss, skip=i < tc.grad_accum - 1):  # DDP: all-reduce at the last one
                with autocast(self.device, self.precision):
                    loss = self.loss(x, y)
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item() / tc.grad_accum
        total = distributed.mean(total)  # DDP: the loss of the global batch
        norm = apply_gradients(self.model, self.optimizer, self.scaler, tc.grad_clip)
        return {"loss": round(total, 5), "lr": lr, "grad_norm": round(norm, 4)}

    def _set_lr(self):
        """Each group at its own peak (Muon's matrices, AdamW's rest) times the schedule's share
        -> AdamW's learning rate, the one the metrics show."""
        share = lr_share(self.step, self.tc, self.time_share)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * share
        return self.tc.learning_rate * share

    def optimizer_step(self, loss):
        """Backward of `loss` and one optimizer step (self-play's); -> the gradient norm before
        clipping. loss None: this rank has nothing to learn from this time (no step in one process;
        DDP: it still joins the others' average, with zero gradients)."""
        if loss is not None:
            self.scaler.scale(loss).backward()
        if distributed.world_size() > 1:
            distributed.average_gradients(self.model)  # DDP: what the wrapper's backward does for train_step
        elif loss is None:
            return 0.0
        return apply_gradients(self.model, self.optimizer, self.scaler, self.tc.grad_clip)

    def warm_up(self):
        """torch.compile the loss when speed.compile_decision says it pays, measuring it first when
        "auto" has no measurement for this config here (once) -> a note if compiling failed.
        Evaluation and self-play use the eager model: other shapes, no recompiles."""
        tc = self.tc
        if self.warmed:
            return None
        self.warmed = True
        # DDP: rank 0's probe file decides for every rank
        on, self.compile_reason = distributed.broadcast(
            compile_choice(self.cfg, tc, self.T, self.device, self.precision, self.probe_file))
        if on is False:
            return None
        x = torch.zeros(tc.batch_size, self.T, dtype=torch.long, device=self.device)

        def try_step(compiled):
            self.model.train()
            try:
                with autocast(self.device, self.precision):
                    compiled(x, x).backward()
            finally:
                self.model.zero_grad(set_to_none=True)

        if on is None:
            return self._probe_compile(try_step)
        self.loss, note = speed.compile_loss(self.loss, self.device, try_step)
        self.compiled = note is None
        if note:
            self.compile_reason = "torch.compile failed"
        return note

    def _probe_compile(self, try_step):
        """compile="auto" without a measurement: time forward+backward of this model eager, then
        compiled; keep the compiled loss if speed.compile_pays, and save the numbers to probe_file.
        The probe draws its dropout from a forked RNG: the run's random numbers are the same with
        it or without it. Its seconds count against a --minutes budget, like the compiling."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            eager_s = speed.time_steps(lambda: try_step(self.loss))
            t0 = time.perf_counter()
            compiled, note = speed.compile_loss(self.loss, self.device, try_step)
            if note:
                self.compile_reason = "torch.compile failed"
                return note
            compile_s = time.perf_counter() - t0
            probe = speed.CompileProbe(eager_s, speed.time_steps(lambda: try_step(compiled)), compile_s)
        probe = distributed.broadcast(probe)  # DDP: every rank follows rank 0's numbers
        if self.probe_file and distributed.is_main():
            speed.save_probe(self.probe_file, probe_key(self.cfg, self.tc, self.T, self.device, self.precision), probe)
        on, self.compile_reason = speed.compile_pays(probe, run_seconds(self.tc, probe.eager_s, self.step), 0.0)
        if on:
            self.loss, self.compiled = compiled, True
        else:
            speed.use_fused_attention(self.loss, True)
        return None

    @torch.no_grad()
    def evaluate(self, max_windows=None):
        """Loss, perplexity and bits/byte on fixed, evenly spaced windows of the val split: as many
        as eval_batches global batches (DDP: rank 0 scores them all). {} if Stop came first."""
        n = max_windows or self.tc.eval_batches * self.tc.batch_size * distributed.world_size()
        out = evaluate_bpb(self.model, self.data["val"], self.byte_len, self.T, n, self.device, self.precision,
                           should_stop=self.should_stop) or {}
        if out and self.selfplay:  # what keep-best weighs against val bits/byte
            out["greedy_repeats"] = self.selfplay.greedy_repeats(self.data["val"])
        return out

    # checkpoints ---------------------------------------------------------------
    def save_checkpoint(self):
        """Trained weights + optimizer state + RNGs + step, in one safetensors file, written atomically.
        DDP: every rank calls it; rank 0 gathers their RNG states and writes the file."""
        rngs = distributed.gather(self._rng_state())
        sp_states = distributed.gather(self.selfplay.state()) if self.selfplay else []  # DDP: each rank's proposer
        if not distributed.is_main():
            return
        tensors = {f"model.{k}": v for k, v in trained_weights(self.model).items()}
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for k in rngs[0]:  # one row per rank: rng.torch is (world_size, state bytes)
            tensors[f"rng.{k}"] = torch.stack([r[k] for r in rngs])
        meta = {"step": self.step, "run_id": self.run_info["run_id"], "scaler": self.scaler.state_dict(),
                "param_groups": opt["param_groups"], "run_best": self.run_best,
                "stale_evals": self.stale_evals, "steps": self.tc.steps, "kept": self.kept,
                "selfplay_from": self.selfplay_from}
        for r, (sp_tensors, sp_meta) in enumerate(sp_states):
            meta[selfplay_key(r)] = sp_meta
            tensors.update({f"{selfplay_key(r)}.{k}": v for k, v in sp_tensors.items()})
        save_tensors(self.ckpt_dir / f"step_{self.step:08d}.safetensors", tensors, meta)
        for old in sorted(self.ckpt_dir.glob("step_*.safetensors"))[: -self.tc.keep_checkpoints]:
            old.unlink()
        for torn in self.ckpt_dir.glob(".*.tmp"):  # a checkpoint, best or run.json a kill -9 cut off: never valid
            torn.unlink(missing_ok=True)  # (and no one else writes here: the run holds its model's lease)
        self._write_run(self.run_info["status"])

    def _claim(self):
        """The first step of a new run is done: from now on it is the folder's run to resume, and the
        files of the run before it (never resumable now) go."""
        self.claimed = True
        if distributed.is_main():  # DDP: the others never write
            for old in self.ckpt_dir.glob("*.safetensors"):
                old.unlink()
        self._write_run("running")

    def restore_latest(self):
        """Load the newest checkpoint that passes its checksum, falling back to older ones."""
        self.claimed = True  # run.json is this run's already
        errors = []
        for path in sorted(self.ckpt_dir.glob("step_*.safetensors"), reverse=True):
            try:
                tensors, meta = load_tensors(path)
            except CorruptFile as e:
                errors.append(str(e))
                continue
            if meta.get("run_id") != self.run_info["run_id"]:
                continue  # another run's file: resuming from it would mix two runs
            note = self._restore(tensors, meta)
            return {"step": self.step, "path": path.name, "skipped": errors, "note": note}
        if errors:
            raise CorruptFile("every checkpoint is damaged: " + "; ".join(errors))
        self._truncate_metrics()  # cut off before the first checkpoint: redo the run from step 0
        return {"step": 0, "path": None, "skipped": [], "note": None}

    def _rng_state(self):
        state = {"torch": torch.get_rng_state(), "batch": self.batch_gen.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state):
        self.batch_gen.set_state(state["batch"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _restore(self, tensors, meta):
        """Load a checkpoint -> None, or a note when the resume cannot be bit-exact."""
        load_trained_weights(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v.to(self.device) if key != "step" else v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.run_best, self.stale_evals = meta["step"], meta.get("run_best"), meta.get("stale_evals", 0)
        self.kept = meta.get("kept") or (self.run_best and [*self.run_best, None])  # None: written before it was kept
        self.selfplay_from = meta.get("selfplay_from")
        self.tc = replace(self.tc, steps=meta.get("steps", self.tc.steps))  # a budget run's fitted schedule
        note = self._restore_rngs({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
        key = selfplay_key(distributed.rank())
        if self.selfplay and key in meta:
            self.selfplay.load_state({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}, meta[key])
        self._truncate_metrics()
        return note

    def _restore_rngs(self, saved):
        """Each rank takes back its own RNG states -> None; or, when the checkpoint was written
        by another number of processes, rank 0's batch stream and fresh dropout noise -> a note."""
        saved = {k: v.reshape(-1, v.shape[-1]) for k, v in saved.items()}  # (world_size, bytes); 1-D before DDP
        n, world, r = len(saved["torch"]), distributed.world_size(), distributed.rank()
        own = {k: v[r if n == world else 0].clone() for k, v in saved.items()}  # a row of its own: set_state wants one
        if self.device.type != "cuda":
            own.pop("cuda", None)
        self._set_rng_state(own)
        if n == world:
            return None
        if r > 0:
            torch.manual_seed(self.tc.seed + r)  # rank 0's dropout stream goes on; the others start fresh
        return (f"the checkpoint was written at world size {n}, this run has world size {world}: training goes on "
                f"from step {self.step}, but not bit-exact (the global batch is now {self.tc.batch_size} x {world} x "
                f"{self.tc.grad_accum} windows, and the windows differ from those the run at world size {n} would see)")

    def _truncate_metrics(self):
        """Drop this run's metric lines past the restored step: the resumed run rewrites them."""
        path = self.metrics_path
        if not distributed.is_main() or not path.exists():
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
        if distributed.is_main() and self.claimed:
            write_json(self.ckpt_dir / "run.json", self.run_info)

    def _track_best(self, val_bpb, repeats=None):
        """Keep the weights of this run's best evaluation on disk. A small book is memorised after
        a few hundred steps and val loss climbs again, so a finished run ends on its best weights.
        With self-play on, "best" is the fewest greedy repeats among the evaluations within
        STOP_RISE of the lowest val bits/byte (kept_better)."""
        if self.run_best is None or val_bpb < self.run_best[0]:
            self.run_best = [val_bpb, self.step]
        now = [val_bpb, self.step, repeats]
        if kept_better(now, self.kept, self.run_best[0]):
            self.kept = now
            if self.tc.keep_best:
                save_tensors(self.ckpt_dir / "best.safetensors", trained_weights(self.model), {"step": self.step})
        # an evaluation within STOP_RISE of the best (a plateau) resets the count: only a rise counts
        self.stale_evals = self.stale_evals + 1 if val_bpb > self.run_best[0] * (1 + STOP_RISE) else 0

    def early_stop(self):
        """Patience: the last `patience` evaluations were all more than STOP_RISE above the best.

        Counting every evaluation that is not a new best (plain patience) stops runs that still have
        far to go: while the learning rate is high, val bits/byte wanders by a fraction of a percent
        around a plateau that the cosine's low-lr end still breaks through — and under a --minutes
        budget the schedule is stretched, so that high-lr stretch is long. A model that memorises
        its book rises well above its best instead, and no later step undoes that. This is
        Prechelt's "generalization loss" criterion (Early Stopping — But When?, 1998: stop when val
        is more than alpha percent above its minimum) required for `patience` evaluations in a row."""
        return bool(self.tc.patience) and self.stale_evals >= self.tc.patience

    def _restore_best(self):
        """At the end of a run: go back to the kept evaluation's weights if the last is not it.
        From here run_best names the weights the run ends with (the store records it)."""
        if self.tc.keep_best and self.kept and self.kept[1] != self.step:
            tensors, _ = load_tensors(self.ckpt_dir / "best.safetensors")
            load_trained_weights(self.model, tensors)
        if self.tc.keep_best and self.kept:
            self.run_best = self.kept[:2]


# ----------------------------------------------------------------------------- pieces


def selfplay_due(step, tc):
    """Before a plateau: a self-play step after every selfplay_every-th supervised step of the
    run's tail, from selfplay_start of the steps on."""
    return bool(tc.selfplay_every) and step >= tc.selfplay_start * tc.steps and step % tc.selfplay_every == 0


def kept_better(now, kept, best_val):
    """Should keep-best hold the weights of evaluation `now` = [val_bpb, step, greedy_repeats]
    instead of `kept`? Without self-play (repeats None): when it is the best. With it: when it is
    within STOP_RISE of the best val, and `kept` no longer is or repeats itself more."""
    if kept is None:
        return True
    if now[2] is None:
        return now[0] == best_val and now[0] < kept[0]
    if now[0] > best_val * (1 + STOP_RISE):
        return False
    return kept[0] > best_val * (1 + STOP_RISE) or kept[2] is None or (now[2], now[0]) < (kept[2], kept[0])


def selfplay_key(rank):
    """The checkpoint's name for a rank's self-play state: rank 0's as before DDP ran self-play."""
    return "selfplay" if rank == 0 else f"selfplay{rank}"


class Budget:
    """A wall-clock budget: its share spent drives the learning-rate schedule, so the schedule ends
    when the time does, and the run's length in steps is re-fitted from the measured time per step.
    The clock started when the run was created (tokenizer and token arrays count); a resumed run
    continues it from run.json."""

    def __init__(self, minutes, run_info, step):
        self.seconds, self.run_info = minutes * 60, run_info
        self.t0 = time.time() - run_info.get("elapsed_s", time.time() - run_info["started"])
        self.start_step = step
        # (step, time) every 10 steps from the 10th on, the last PACE_STEPS steps' worth: the pace
        self.marks = collections.deque(maxlen=PACE_STEPS // 10 + 1)

    def elapsed(self):
        return time.time() - self.t0

    def share(self):
        """How much of the budget is spent, 0..1: the schedule's clock (lr_share)."""
        return min(1.0, self.elapsed() / self.seconds)

    def over(self):
        return self.elapsed() >= self.seconds

    def fit(self, step, steps):
        """The run's length after `step` (what the page and the ETA show; the schedule follows the
        clock itself, share()), re-fitted every 10 steps from the time per step of the last
        PACE_STEPS steps (never the first 10: caches, allocations, compilation). The recent pace,
        not the run's average: on a machine that slows down an average promises steps that never come."""
        self.run_info["elapsed_s"] = round(self.elapsed(), 3)
        if self.over():
            return step
        done = step - self.start_step
        if done < 10 or done % 10:
            return steps
        self.marks.append((step, time.time()))
        if len(self.marks) < 2:
            return steps
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return step + max(1, int((self.seconds - self.elapsed()) / ((t1 - t0) / (s1 - s0))))


def new_run(books, tc, **extra):
    """The record of a run (run.json): its id, books, options and status."""
    return {"run_id": uuid.uuid4().hex[:8], "books": list(books), "config": asdict(tc), "status": "running",
            "base_steps": 0, "started": time.time(), **extra}


def window_len(tc, cfg):
    """Tokens per training window: seq_len, or the model's whole context when it is 0. Never
    more than the context: positions past max_seq_len have no embedding to look up."""
    T = tc.seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise ValueError(f"seq_len {T} is longer than the model's context (max_seq_len {cfg.max_seq_len}); "
                         f"use at most {cfg.max_seq_len}, or 0 for the whole context")
    return T


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
    """The learning rate of AdamW's groups at `step` (Muon's: muon_lr times the same share)."""
    return tc.learning_rate * lr_share(step, tc)


def lr_share(step, tc, time_share=None):
    """The schedule, as a share of the peak: linear warm-up to 1, then down to min_lr_ratio at the
    end, along a cosine (Loshchilov & Hutter 2017) or warmup-stable-decay: flat at the peak, then a
    straight line over the last WSD_DECAY of the run. The run's progress is its share of the steps,
    or, in a time budget, `time_share`, the share of the budget spent: the schedule then ends when
    the time does however the pace changes (other work on the machine, a laptop's heat), where a
    step count fitted from a pace would end early or late."""
    floor = tc.min_lr_ratio
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "wsd":
        if time_share is None:
            decay_start = max(tc.warmup_steps, tc.steps * (1 - WSD_DECAY))
            progress = (step - decay_start) / max(1, tc.steps - decay_start)
        else:
            progress = (time_share - (1 - WSD_DECAY)) / WSD_DECAY
        return 1 - (1 - floor) * min(1.0, max(0.0, progress))
    if time_share is None:
        progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    else:
        progress = time_share
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def compile_choice(cfg, tc, T, device, precision, probe_file=None):
    """-> (compile?, reason) for the run `tc` describes: speed.compile_decision given its work and,
    for compile="auto", the probe of this config on this machine saved in `probe_file` (compile?
    is None when there is none yet: the trainer probes at its start)."""
    run_flops = tc.steps * tc.grad_accum * tc.batch_size * T * flops_per_token(cfg, T)
    key = probe_key(cfg, tc, T, device, precision)
    measured = speed.load_probe(probe_file, key) if probe_file and tc.compile == "auto" else None
    run_s = run_seconds(tc, measured.eager_s) if measured else 0.0
    return speed.compile_decision(tc.compile, device, run_flops, tc.minutes, measured, run_s)


def probe_key(cfg, tc, T, device, precision):
    machine = machine_kind(device) + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    return speed.probe_key(machine, cfg, tc.batch_size, T, precision)


def run_seconds(tc, eager_s, step=0):
    """How long the rest of the run would take in eager forward+backward passes: its --minutes
    budget, or its steps (from `step` on) at eager_s per pass."""
    return tc.minutes * 60 if tc.minutes else (tc.steps - step) * tc.grad_accum * eager_s


def seconds_per_step(model, tc, precision, steps=3):
    """A probe: the wall time of one eager training step (forward, backward, clipping, the optimizer's step) of
    `model` at tc's batch and window, the median of `steps` steps after a warm-up step. The work of
    a step does not depend on the tokens, so they are random, and the steps change `model`: give it
    a throwaway one. What a page shows before a run starts: time per 1000 steps on this machine."""
    model.train()
    device = next(model.parameters()).device
    T = window_len(tc, model.config)
    loss_fn, optimizer = speed.TrainLoss(model), make_optimizer(model, tc)
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


def apply_gradients(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the gradient norm, step the optimizer, zero the gradients -> the norm before clipping."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def make_optimizer(model, tc):
    """tc.optimizer over the trained parameters. AdamW: weight decay on matrices only, since
    decaying biases and LayerNorm gains pulls them towards 0, which only hurts (they are few and do
    not overfit). Muon: muon_groups. Each group keeps its peak lr in `peak_lr` for the schedule."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if tc.optimizer == "muon":
        return Muon(muon_groups(named, tc), betas=(0.9, 0.95), eps=1e-8)
    params = list(named.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [{**g, "peak_lr": tc.learning_rate} for g in groups]
    # fused: one kernel per tensor for the whole update instead of ~10 elementwise passes over memory
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def muon_groups(named, tc):
    """Muon for the weight matrices of the blocks, c_attn's as three (q, k and v are three maps);
    AdamW for the rest: embeddings (wte is also the head: tied), gains, biases, LoRA's A and B
    (a fine-tune's only parameters: low-rank factors, not maps of their own)."""
    hidden = {k: p for k, p in named.items() if k.startswith("transformer.h.") and k.endswith(".weight") and p.dim() == 2}
    qkv = [p for k, p in hidden.items() if k.endswith("attn.c_attn.weight")]
    other = [p for k, p in hidden.items() if not k.endswith("attn.c_attn.weight")]
    tables = [p for k, p in named.items() if p.dim() >= 2 and k not in hidden]
    vectors = [p for p in named.values() if p.dim() < 2]
    groups = [dict(params=qkv, muon=True, blocks=3, peak_lr=tc.muon_lr, weight_decay=tc.weight_decay),
              dict(params=other, muon=True, blocks=1, peak_lr=tc.muon_lr, weight_decay=tc.weight_decay),
              dict(params=tables, peak_lr=tc.learning_rate, weight_decay=tc.weight_decay),
              dict(params=vectors, peak_lr=tc.learning_rate, weight_decay=0.0)]
    return [{**g, "lr": g["peak_lr"]} for g in groups if g["params"]]


@torch.no_grad()
def evaluate_bpb(model, data, byte_len, T, n_windows, device, precision="fp32", batch_size=16, should_stop=None):
    """Cross-entropy over up to n_windows evenly spaced, non-overlapping windows of `data`.
    bits/byte = (sum of losses in nats) / ln 2 / (bytes of text those target tokens spell).
    Leaves the model in the mode (train or eval) it found it in. None if `should_stop()` turns
    True between two batches (a Stop during a long evaluation)."""
    was_training = model.training
    model.eval()
    n_windows = max(1, min(n_windows, (len(data) - 1) // T))
    starts = np.linspace(0, len(data) - T - 1, n_windows).astype(np.int64)
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for i in range(0, n_windows, batch_size):
        if should_stop and should_stop():
            model.train(was_training)
            return None
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
