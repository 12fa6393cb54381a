"""The training loop: supervised next-token steps, optional self-play steps, evaluation,
checkpoints and exact resume.

One supervised step: sample B random windows of T+1 tokens from the book, predict tokens 1..T
from 0..T-1, cross-entropy, backward, clip the gradient norm to 1, an optimizer step: AdamW, or
Muon (muon.py) for the blocks' matrices with AdamW for the rest, at the learning rate the
schedule gives for this step (schedule.py: warm-up, then down to a tenth of the peak). Every
`eval_every` steps the run scores the validation split in bits per byte (evaluate.py), keeps the
weights of its best evaluation and stops early once it is clearly past it (keep_best.py) — unless
the learning rate is still at warmup-stable-decay's peak: then the run goes back to its kept weights
and the decay starts (schedule.py says why).

Self-play (selfplay.py) lets the model learn from its own greedy continuations where they loop.
It begins when supervised learning stops paying: in the tail of the run, from `selfplay_start` on
(which a plateau at the peak learning rate brings in with the decay), one self-play step after
every `selfplay_every` supervised steps; and where early stopping would end the run, the run goes
back to its kept weights and goes on with self-play steps only (selfplay.py's docstring says why).

Exact resume: a checkpoint holds everything the future depends on (checkpoint.py), so stopping at
step k and resuming reproduces the uninterrupted run's loss at every later step, bit for bit. A
new run leaves the last run's run.json and checkpoints in its folder until its own first step is
done (checkpoint.RunFolder), so a start that fails, or is stopped at once, costs the last run nothing.

Several processes (torchrun, distributed.py): every rank runs this same loop on its own batches,
and DistributedDataParallel averages the gradients, so one step trains on a global batch of
batch_size x world_size x grad_accum windows; steps and the learning-rate schedule count
optimizer steps, as in one process. The lines that differ are marked `# DDP:`. Rank 0 alone
evaluates and writes (metrics, checkpoints, run.json, the result); a checkpoint holds the RNGs of
every rank, so a resume on as many processes is exact too. Self-play: each rank rolls out its own
contexts, and its update's gradients are averaged by hand (its forward needs logits, so it goes
around the DDP wrapper, which only knows the training loss).

`Trainer` is the loop: when to step, evaluate, keep, start the decay, switch to self-play, checkpoint
and stop.
`Stepper` is the update it calls: the optimizer, the gradient scaler, the batches, the loss module.

The trainer knows a model, its token arrays and a folder for its checkpoints. Where models and
books live on disk is the store's business; app/runs.py connects the two.
"""

import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import checkpoint
import config
import distributed
import keep_best
import speed
from config import SEED_MAX, setting
from evaluate import evaluate_bpb
from hardware import autocast, pick_precision
from keep_best import STOP_RISE, Best
from muon import apply_gradients, make_optimizer
from schedule import WSD_DECAY, Budget, at_peak, decay_now, lr_share
from sizing import window_len


SAMPLE_PROMPT_MAX_CHARS = 500  # a sample shows how the model continues a line, not a chapter


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
    muon_lr: float = setting(1e-2, "peak learning rate of Muon's matrices (used with optimizer muon)", 1e-8, 1.0)
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
                                        "step after every N supervised steps; where early stopping would end a run whose "
                                        "decay has begun, it goes back to its kept weights and takes self-play steps "
                                        "only. Time with --steps N: a self-play step costs a supervised step's update "
                                        "plus decoding its rollouts token by token; in the tail one comes on top of "
                                        "every selfplay_every-th step, after a plateau they replace the steps left",
                                  0, 100_000)
    selfplay_start: float = setting(0.8, "with self-play on: the share of the steps after which it begins, if no "
                                         "plateau starts it earlier", 0.0, 1.0)
    minutes: float = setting(0.0, "train for this much wall-clock time instead of `steps`: the learning-rate "
                                  "schedule follows the clock and ends with it (0 = off)", 0.0, 1e6)
    patience: int = setting(3, f"stop once val bits/byte has been over {STOP_RISE * 100:g} percent above its best for "
                                f"this many evaluations in a row (0 = never); in wsd's flat phase, go back to the best "
                                f"weights and start the decay instead", 0, 10_000)
    keep_best: bool = setting(True, "finish with the weights of the best evaluation")
    val_fraction: float = setting(0.1, "share of the book held out for validation", 0.01, 0.5)
    sample_tokens: int = setting(32, "at each evaluation, continue the sample prompt by this many tokens (0 = off)", 0, 256)
    sample_prompt: str | None = setting(None, "the prompt of those samples (empty = the book's first line)")

    def validate(self):
        config.validate(self)
        if self.sample_prompt and len(self.sample_prompt) > SAMPLE_PROMPT_MAX_CHARS:
            raise config.SettingError(f"sample_prompt must be at most {SAMPLE_PROMPT_MAX_CHARS} characters, "
                                      f"got {len(self.sample_prompt)}", "sample_prompt")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise config.SettingError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
                                          "device") from None
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
    app/runs.py writes it with the tokenizer, which the trainer does not know); it goes into the
    evaluation's metrics row, so a run's samples show what the model learned step by step."""

    def __init__(self, model, data, byte_len, tc, ckpt_dir, metrics_path, run_info, sample=None, probe_file=None):
        self.model, self.data, self.byte_len, self.tc = model, data, byte_len, tc.validate()
        self.sample = sample
        self.folder, self.run_info = checkpoint.RunFolder(ckpt_dir, metrics_path, run_info), run_info
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            speed.keep_freed_memory()
        self.precision = pick_precision(self.device, tc.precision)
        self.cfg = model.config
        self.T = check_fits(data, window_len(tc, self.cfg))
        self.stepper = Stepper(model, data["train"], self.tc, self.T, self.precision, probe_file)
        self.step = 0
        self.should_stop = lambda: False  # run() takes the caller's
        torch.manual_seed(tc.seed + distributed.rank())  # DDP: dropout noise, each rank its own; saved in checkpoints
        self.selfplay = None
        if tc.selfplay_every:
            from selfplay import SelfPlay  # only needed when the stage is on
            # DDP: each rank proposes and rolls out its own contexts
            self.selfplay = SelfPlay(model, self.stepper.optimizer_step, data["train"], self.precision,
                                     tc.seed + distributed.rank())
        self.time_share = None  # in a time budget, the share of it spent: the schedule's clock (lr_share)
        self.decay_from = None  # the step where a plateau at the peak learning rate started the decay
        self.selfplay_from = None  # the step where a plateau switched the run into self-play steps only
        self.best = Best()  # the best evaluation, the kept one (best.safetensors), early stopping's count

    @property
    def run_best(self):
        """[val_bpb, step] of this run's best evaluation; at the end, of the weights it ends with."""
        return self.best.run_best

    # the loop ------------------------------------------------------------------
    def run(self, on_event=None, should_stop=None, on_finish=None):
        """Train up to tc.steps. `on_finish(status)` saves the result (app/runs.py: into the store)
        before run.json says the run is over, so a failure there fails the run. -> a summary.
        `should_stop` (the web app's Stop) must answer alike on every rank; the CLI passes none."""
        emit = on_event or (lambda e: None)
        self.should_stop = should_stop or self.should_stop
        main = distributed.is_main()  # DDP: rank 0 writes; the others only train
        self.folder.write_run("running", self.step, world_size=distributed.world_size())
        self._start(emit)
        metrics = self.folder.open_metrics()
        try:
            status, end_reason = self._steps(emit, metrics)
            if main and status == "done" and self.tc.keep_best:
                keep_best.end_on_kept(self.best, self.folder.ckpt_dir, self.model, self.step)
            if main and on_finish:
                on_finish(status)
            self.folder.write_run(status, self.step)
            distributed.barrier()  # DDP: the job ends when rank 0 has saved the result
        except Exception as e:  # a full disk in on_finish fails the run like any other error
            self.folder.write_run("failed", self.step, error=str(e))
            emit({"type": "failed", "step": self.step, "error": str(e)})
            raise
        finally:
            metrics.close()
        emit({"type": status, "step": self.step, "total": self.tc.steps, "best": self.run_best,
              "end_reason": end_reason})
        return {"status": status, "end_reason": end_reason, "step": self.step, "total": self.tc.steps,
                "best": self.run_best, "device": str(self.device), "precision": self.precision,
                "compiled": self.stepper.compiled}

    def _start(self, emit):
        """Decide on torch.compile, then tell the caller what is about to run."""
        note = self.stepper.decide_compile(self.tc, self.step)
        emit({"type": "start", "step": self.step, "total": self.tc.steps, "device": str(self.device),
              "precision": self.precision, "tokens": {s: len(d) for s, d in self.data.items()},
              "params": self.run_info.params, "run_id": self.run_info.run_id, "compiled": self.stepper.compiled,
              "compile_reason": self.stepper.compile_reason})
        if note:
            emit({"type": "warning", "message": note})

    def _steps(self, emit, metrics):
        """Step until the run ends: its steps (or its time) are done, Stop, or early stopping.
        -> (status, end_reason): done or stopped, and why, for the page."""
        budget = Budget(self.tc.minutes, self.run_info, self.step) if self.tc.minutes else None
        t_start, step_start = time.time(), self.step
        while self.step < self.tc.steps:
            if budget:  # DDP: rank 0's clock, so that every rank steps at the same learning rate
                self.time_share = distributed.broadcast(budget.share())
            try:
                if self.should_stop():
                    raise StepAbandoned
                row = self._one_step()
            except StepAbandoned:  # Stop, before or in the middle of a step: resume redoes it
                if self.folder.claimed:  # stopped before its first step: the last run stays the one to resume
                    self.save_checkpoint()
                return "stopped", "stopped"
            if budget and distributed.broadcast(budget.over()):  # time is up (rank 0's clock): the last step
                self.tc = replace(self.tc, steps=self.step)
                if "val_bpb" not in row and distributed.is_main():  # and it is evaluated
                    self._score(row)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if budget:
                self.tc = replace(self.tc, steps=distributed.broadcast(budget.fit(self.step, self.tc.steps)))
            row["eta_s"] = round((time.time() - t_start) / (self.step - step_start) * (self.tc.steps - self.step), 1)
            clock = {"elapsed_s": round(budget.elapsed(), 1), "budget_s": budget.seconds} if budget else {}
            emit({"type": "step", "total": self.tc.steps, **row, **clock})
            if self._evaluated(self.step) and distributed.broadcast(self.best.early_stop(self.tc.patience)):
                if self._past_plateau(budget, emit):
                    self.save_checkpoint()  # a resume must not replay it: best.safetensors moves on
                    continue
                emit({"type": "info", "message": f"early stop at step {self.step}: val bits/byte has been more than "
                                                 f"{STOP_RISE:.0%} above its best for {self.tc.patience} evaluations "
                                                 f"(best {self.run_best[0]:.4f} at step {self.run_best[1]})"})
                return "done", "early_stop"
            if self.step % self.tc.checkpoint_every == 0 and self.step < self.tc.steps:
                self.save_checkpoint()
        return "done", "plateau" if self.decay_from is not None else "budget" if budget else "steps"

    def _one_step(self):
        """A supervised step, then self-play and evaluation when they are due -> its metrics row.
        After a plateau the step is a self-play step alone (its row has no supervised loss)."""
        t0, share = time.time(), lr_share(self.step, self.tc, self.time_share)  # by the step, or the clock
        if self.selfplay_from is None:
            row = self.stepper.train_step(share, self.should_stop)
        else:
            row = {"lr": self.stepper.set_lr(share), "selfplay": self.selfplay.step()}
        self.step += 1
        if not self.folder.claimed:
            self.folder.claim(self.step)
        tokens = self.tc.batch_size * distributed.world_size() * self.tc.grad_accum * self.T  # the global batch
        row.update(run=self.run_info.run_id, step=self.step, time=round(time.time(), 3),
                   tokens_per_s=round(tokens / (time.time() - t0), 1))
        if self.selfplay_from is None and selfplay_due(self.step, self.tc):
            row["selfplay"] = self.selfplay.step()
        if self._evaluated(self.step) and distributed.is_main():  # DDP: the others wait at the next step's all-reduce
            self._score(row)
        return row

    def _evaluated(self, step):
        return step % self.tc.eval_every == 0 or step == self.tc.steps

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

    # keep-best and the plateau (keep_best.py) --------------------------------------
    def _score(self, row):
        """Evaluate into the step's `row`, with a sample, and keep the weights on disk if they are the
        run's best evaluation (keep_best.py says which is best)."""
        row.update(self.evaluate())
        if "val_bpb" not in row:  # Stop cut the evaluation short: the step stands, unscored
            return
        if self.sample:
            row["sample"] = self.sample(self.model)
        if self.best.track(row["val_bpb"], self.step, row.get("greedy_repeats")) and self.tc.keep_best:
            keep_best.save_kept(self.folder.ckpt_dir, self.model, self.step)

    def _past_plateau(self, budget, emit):
        """Early stopping fired: go on past the plateau where something is left to try -> whether the
        run goes on. At warmup-stable-decay's peak: the decay; then, with self-play on, self-play steps."""
        if at_peak(self.step, self.tc, self.time_share):
            self.decay_from_plateau(budget)  # (DDP: after it, every rank knows the kept step, not only rank 0)
            end = f"{budget.seconds / 60:.1f} minutes" if budget else f"step {self.tc.steps}"
            emit({"type": "info", "message": f"plateau at step {self.step} at the peak learning rate: back to the "
                                             f"weights of step {self.best.kept[1]}; the learning rate comes down "
                                             f"from here, and the run ends at {end}"})
        elif self.selfplay and self.selfplay_from is None:
            self.switch_to_selfplay()
            emit({"type": "info", "message": f"plateau at step {self.step}: back to the weights of step "
                                             f"{self.best.kept[1]}, self-play steps from here on"})
        else:
            return False
        return True

    def decay_from_plateau(self, budget):
        """A plateau at warmup-stable-decay's peak: go back to the kept weights and bring the learning
        rate down from here, the run's end moving in to match (schedule.decay_now says why)."""
        self.decay_from = self.step
        keep_best.back_to_kept(self.best, self.folder.ckpt_dir, self.model, weights=self.tc.keep_best)
        self.tc = decay_now(self.step, self.tc, self.time_share)
        if budget:
            budget.seconds = self.tc.minutes * 60

    def switch_to_selfplay(self):
        """The plateau: supervised steps stopped paying. Go back to the kept weights and go on with
        self-play steps; if they cost likelihood, early stopping ends the run as it would have here."""
        self.selfplay_from = self.step
        keep_best.back_to_kept(self.best, self.folder.ckpt_dir, self.model, weights=self.tc.keep_best)

    # checkpoints (checkpoint.py: the format) -------------------------------------
    def save_checkpoint(self):
        """Everything the run's future depends on, in one file, then run.json (DDP: every rank calls it)."""
        loop = {"run_id": self.run_info.run_id, **asdict(self.best), "steps": self.tc.steps, "minutes": self.tc.minutes,
                "decay_from": self.decay_from, "selfplay_from": self.selfplay_from}  # what the loop decided so far
        s = self.stepper
        checkpoint.save_run(self.folder.ckpt_dir, self.step, loop, self.model, s.optimizer, s.scaler, s.batch_gen,
                            self.selfplay, self.tc.keep_checkpoints)
        self.folder.write_run(self.run_info.status, self.step)

    def restore_latest(self):
        """Load the newest checkpoint that passes its checksum, falling back to older ones; with
        none (cut off before the first one), the run starts again from step 0."""
        found = self.folder.latest()
        path, skipped, note = None, [], None
        if found:
            path, tensors, meta, skipped = found
            self.step, self.best = meta["step"], Best.from_meta(meta)
            self.decay_from, self.selfplay_from = meta.get("decay_from"), meta.get("selfplay_from")
            # a budget run's fitted steps; a plateau's shortened run
            self.tc = replace(self.tc, steps=meta.get("steps", self.tc.steps), minutes=meta.get("minutes", self.tc.minutes))
            s = self.stepper
            note = checkpoint.restore_run(tensors, meta, self.tc, self.model, s.optimizer, s.scaler, s.batch_gen,
                                          self.selfplay)
        self.folder.truncate_metrics(self.step)
        return {"step": self.step, "path": path and path.name, "skipped": skipped, "note": note}


class Stepper:
    """The update: one optimizer step, on a batch of the book (`train_step`) or on a loss handed in
    (`optimizer_step`: self-play's). It holds what a step changes besides the weights: the optimizer
    (AdamW, or Muon for the blocks' matrices and AdamW for the rest) with its state, the gradient
    scaler (fp16), the batch sampler's generator; and the loss module that runs the model. The
    learning rate comes from the loop, as a share of each group's peak (schedule.py)."""

    def __init__(self, model, train_tokens, tc, T, precision, probe_file=None):
        # from tc: the batch, accumulation, clipping and peak lr; the run's length is the loop's
        self.model, self.data, self.tc, self.T, self.precision = model, train_tokens, tc, T, precision
        self.probe_file = probe_file  # compile="auto"'s measurements, per machine and config (a JSON file)
        self.device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        # DDP: the wrapped loss module runs the model forward; its backward all-reduces the gradients
        self.loss = distributed.wrap(speed.TrainLoss(model))  # compiled as well when compiling pays (decide_compile)
        self.batch_gen = torch.Generator().manual_seed(tc.seed)
        self.compiled = self.compile_decided = False
        self.compile_reason = None

    def decide_compile(self, tc, step):
        """Once, before the first step: torch.compile the loss if it pays for the run `tc` from `step`
        on (speed.compile_for_run: the setting, or a probe of a few steps) -> a note if compiling failed."""
        if self.compile_decided:
            return None
        self.compile_decided = True
        self.loss, self.compiled, self.compile_reason, note = speed.compile_for_run(
            self.loss, self.model, tc, self.T, self.precision, self.probe_file, step)
        return note

    def train_step(self, share, should_stop=lambda: False):
        """One optimizer step over grad_accum micro-batches at `share` of the peak learning rates;
        returns {loss, lr, grad_norm}. Stop is checked before each micro-batch: a step of many can
        take minutes. A step stopped half-way is dropped (StepAbandoned) as if it never began: its
        gradients are zeroed and the RNGs set back, so the resumed run draws the same batches the
        whole step would have."""
        tc = self.tc
        self.model.train()
        lr = self.set_lr(share)
        total, rngs = 0.0, checkpoint.rng_state(self.batch_gen, self.device)
        for i in range(tc.grad_accum):
            if i and should_stop():
                self.optimizer.zero_grad(set_to_none=True)
                checkpoint.set_rng_state(self.batch_gen, rngs, self.device)
                raise StepAbandoned
            x, y = get_batch(self.data, tc.batch_size, self.T, self.batch_gen, self.device)
            with distributed.no_sync(self.loss, skip=i < tc.grad_accum - 1):  # DDP: all-reduce at the last one
                with autocast(self.device, self.precision):
                    loss = self.loss(x, y)
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item() / tc.grad_accum
        total = distributed.mean(total)  # DDP: the loss of the global batch
        norm = apply_gradients(self.model, self.optimizer, self.scaler, tc.grad_clip)
        return {"loss": round(total, 5), "lr": lr, "grad_norm": round(norm, 4)}

    def set_lr(self, share):
        """Each group at its own peak (Muon's matrices, AdamW's rest) times the schedule's `share`
        -> AdamW's learning rate, the one the metrics show."""
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


# ----------------------------------------------------------------------------- pieces


def selfplay_due(step, tc):
    """Before a plateau: a self-play step after every selfplay_every-th supervised step of the
    run's tail, from selfplay_start of the steps on."""
    return bool(tc.selfplay_every) and step >= tc.selfplay_start * tc.steps and step % tc.selfplay_every == 0


def check_fits(data, T):
    """-> T, if every split of the book holds a window of T+1 tokens (x and its shifted y)."""
    short = min(len(d) for d in data.values())
    if short <= T + 1:
        raise ValueError(f"the book is too short: its validation split has {short} tokens but one "
                         f"window needs {T + 1}; give a longer book or a smaller seq_len")
    return T


def get_batch(data, B, T, gen, device):
    """B random windows of `data` -> x, y (B, T): y is x shifted left by one token. DDP: every rank
    draws the starts of the whole global batch from the same generator `gen` and keeps its own B of
    them, so the ranks see different windows, and together the ones one process would draw."""
    r = distributed.rank()
    starts = torch.randint(len(data) - T - 1, (B * distributed.world_size(),), generator=gen)
    ix = starts[r * B:(r + 1) * B].numpy()
    rows = data[ix[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
    xy = torch.from_numpy(rows).to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]
