"""The checkpoint format: everything a run's future depends on, in one safetensors file.

Resuming is exact only if nothing the next steps read is lost: the trained weights, the
optimizer's state (AdamW's two moments, Muon's momentum, the step count of each), the gradient
scaler (fp16), the step, the batch sampler's RNG and the global RNG (dropout), and what the loop
decided so far (its best evaluation, early stopping's count, a plateau's switch to self-play, a
time budget's fitted length). Then stopping at step k and resuming reproduces the uninterrupted
run's loss at every later step, bit for bit (tests/test_trainer.py).

One file per checkpoint, `step_00000100.safetensors`: tensors under prefixes ("model.",
"opt.<param>.<key>", "rng.<name>", "selfplay.<key>"), the rest as JSON in the file's metadata,
checksummed and written atomically (files.save_tensors), so a damaged or half-written file is
skipped for the one before it. DDP: rank 0 writes the file, with one row of RNG state per rank.

The checkpoints live in the run's folder (`RunFolder`) beside run.json, which says whose they are:
a new run leaves the last run's files there, resumable, until its own first step is done.
"""

import json
import os

import torch

import distributed
from files import CorruptFile, atomic_write, load_tensors, load_weights, save_tensors, weights_of


# ----------------------------------------------------------------------------- a run's folder


class RunFolder:
    """The folder of a run: its checkpoints and best.safetensors, run.json (the Run record
    `run_info`: status, step, ...), and apart from them its metrics file, one JSON line per step.
    A new run leaves the folder's last run (run.json, checkpoints) resumable until its own first
    step is done (`claim`): a start that fails (a short book, no memory, compiling) or is stopped
    at once destroys nothing. DDP: rank 0 alone writes."""

    def __init__(self, ckpt_dir, metrics_path, run_info):
        self.ckpt_dir, self.metrics_path, self.run_info = ckpt_dir, metrics_path, run_info
        self.claimed = False  # whether run.json is this run's
        if distributed.is_main():
            ckpt_dir.mkdir(parents=True, exist_ok=True)

    def claim(self, step):
        """The first step of a new run is done: from now on it is the folder's run to resume, and the
        files of the run before it (never resumable now) go."""
        self.claimed = True
        if distributed.is_main():
            for old in self.ckpt_dir.glob("*.safetensors"):
                old.unlink()
        self.write_run("running", step)

    def write_run(self, status, step, **extra):
        self.run_info.update(status=status, step=step, **extra)
        if distributed.is_main() and self.claimed:
            self.run_info.save(self.ckpt_dir / "run.json")

    def open_metrics(self):
        """The metrics file, to append to (DDP: rank 0's; the others write nowhere)."""
        return open(self.metrics_path if distributed.is_main() else os.devnull, "a", encoding="utf-8")

    def latest(self):
        """A resume: run.json is this run's already -> `latest` of its checkpoints."""
        self.claimed = True
        return latest(self.ckpt_dir, self.run_info.run_id)

    def truncate_metrics(self, step):
        truncate_metrics(self.metrics_path, self.run_info.run_id, step)


# ----------------------------------------------------------------------------- a run's state


def save_run(ckpt_dir, step, loop, model, optimizer, scaler, batch_gen, selfplay=None, keep=3):
    """A running trainer's checkpoint: the weights it trains, its optimizer and gradient scaler,
    every rank's RNGs and self-play state, and `loop` (what the loop decided so far: JSON).
    DDP: every rank calls it; rank 0 gathers the others' states and writes the file."""
    device = next(model.parameters()).device
    rngs = distributed.gather(rng_state(batch_gen, device))
    sp_states = distributed.gather(selfplay.state()) if selfplay else []  # DDP: each rank's proposer
    if distributed.is_main():
        meta = {**loop, "scaler": scaler.state_dict()}
        save(ckpt_dir, step, weights_of(model, trainable_only=True), optimizer, rngs, meta, sp_states, keep)


def restore_run(tensors, meta, tc, model, optimizer, scaler, batch_gen, selfplay=None):
    """Put a checkpoint (`latest`) back into the pieces save_run took: weights, optimizer, scaler,
    this rank's RNGs and self-play state -> None, or a note when the resume cannot be bit-exact.
    What the loop decided (meta's step, best, ...) is the loop's to take back."""
    device = next(model.parameters()).device
    load_weights(model, part(tensors, "model"), trainable_only=True)
    load_optimizer(optimizer, tensors, meta, device)
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    note = restore_rngs(part(tensors, "rng"), batch_gen, device, tc, meta["step"])
    key = selfplay_key(distributed.rank())
    if selfplay and key in meta:
        selfplay.load_state(part(tensors, key), meta[key])
    return note


# ----------------------------------------------------------------------------- the file


def save(ckpt_dir, step, weights, optimizer, rngs, meta, selfplay_states=(), keep=3):
    """Write step_<step>.safetensors: `weights` (the trained tensors), the optimizer's state, every
    rank's `rngs` (rng_state) and selfplay_states ((tensors, meta) per rank), and `meta` (JSON).
    Keeps the `keep` newest checkpoints."""
    tensors = {f"model.{k}": v for k, v in weights.items()}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    for k in rngs[0]:  # one row per rank: rng.torch is (world_size, state bytes)
        tensors[f"rng.{k}"] = torch.stack([r[k] for r in rngs])
    meta = {"step": step, **meta, "param_groups": opt["param_groups"]}
    for r, (sp_tensors, sp_meta) in enumerate(selfplay_states):
        meta[selfplay_key(r)] = sp_meta
        tensors.update({f"{selfplay_key(r)}.{k}": v for k, v in sp_tensors.items()})
    save_tensors(ckpt_dir / f"step_{step:08d}.safetensors", tensors, meta)
    for old in sorted(ckpt_dir.glob("step_*.safetensors"))[:-keep]:
        old.unlink()
    for torn in ckpt_dir.glob(".*.tmp"):  # a checkpoint, best or run.json a kill -9 cut off: never valid
        torn.unlink(missing_ok=True)


def latest(ckpt_dir, run_id):
    """The newest checkpoint of run `run_id` that passes its checksum -> (path, tensors, meta,
    the errors of newer damaged ones), or None when the run has none. Raises CorruptFile when
    every checkpoint is damaged."""
    errors = []
    for path in sorted(ckpt_dir.glob("step_*.safetensors"), reverse=True):
        try:
            tensors, meta = load_tensors(path)
        except CorruptFile as e:
            errors.append(str(e))
            continue
        if meta.get("run_id") != run_id:
            continue  # another run's file: resuming from it would mix two runs
        return path, tensors, meta, errors
    if errors:
        raise CorruptFile("every checkpoint is damaged: " + "; ".join(errors))
    return None


def part(tensors, prefix):
    """The tensors saved under `prefix` ("model", "rng", a self-play key), without it."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_optimizer(optimizer, tensors, meta, device):
    state = {}
    for k, v in part(tensors, "opt").items():
        i, key = k.split(".", 1)
        state.setdefault(int(i), {})[key] = v.to(device) if key != "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def selfplay_key(rank):
    """The checkpoint's name for a rank's self-play state: rank 0's as before DDP ran self-play."""
    return "selfplay" if rank == 0 else f"selfplay{rank}"


# ----------------------------------------------------------------------------- random numbers


def rng_state(batch_gen, device):
    """The RNGs the next steps draw from: the batch sampler's and the global one (dropout)."""
    state = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(batch_gen, state, device):
    batch_gen.set_state(state["batch"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rngs(saved, batch_gen, device, tc, step):
    """Each rank takes back its own RNG states -> None; or, when the checkpoint was written
    by another number of processes, rank 0's batch stream and fresh dropout noise -> a note."""
    saved = {k: v.reshape(-1, v.shape[-1]) for k, v in saved.items()}  # (world_size, bytes); 1-D before DDP
    n, world, r = len(saved["torch"]), distributed.world_size(), distributed.rank()
    own = {k: v[r if n == world else 0].clone() for k, v in saved.items()}  # a row of its own: set_state wants one
    if device.type != "cuda":
        own.pop("cuda", None)
    set_rng_state(batch_gen, own, device)
    if n == world:
        return None
    if r > 0:
        torch.manual_seed(tc.seed + r)  # rank 0's dropout stream goes on; the others start fresh
    return (f"the checkpoint was written at world size {n}, this run has world size {world}: training goes on "
            f"from step {step}, but not bit-exact (the global batch is now {tc.batch_size} x {world} x "
            f"{tc.grad_accum} windows, and the windows differ from those the run at world size {n} would see)")


def truncate_metrics(path, run_id, step):
    """Drop run `run_id`'s metric lines past `step` (rank 0's file): the resumed run rewrites them."""
    if not distributed.is_main() or not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if not (row.get("run") == run_id and row.get("step", 0) > step):
            keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))
