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
"""

import json

import torch

import distributed
from files import CorruptFile, atomic_write, load_tensors, save_tensors


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
