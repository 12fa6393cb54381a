"""Training on several processes or GPUs with PyTorch's own engine: torchrun, torch.distributed, DDP.

    torchrun --standalone --nproc_per_node 2 cli.py train big --book books/example_book.txt --steps 2000

**torchrun** starts N copies of the command and tells each who it is in environment variables:
RANK (0 .. WORLD_SIZE-1 over all machines), WORLD_SIZE, LOCAL_RANK (its number on this machine,
which picks its GPU), and where the ranks meet (MASTER_ADDR, MASTER_PORT). `started()` connects
them into a process group: NCCL between GPUs, gloo between CPU processes.

**DistributedDataParallel** (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating
Data Parallel Training"): each rank holds the whole model and the whole optimizer and runs the
whole step on its own batch. At wrap time rank 0's weights are broadcast, so all copies start
equal. During backward the gradients are grouped in buckets (about 25 MB, in the reverse order of
the forward, the order backward makes them); as soon as a bucket is complete its all-reduce, the
average over the ranks, starts — while backward goes on computing the earlier layers' gradients,
so the communication hides behind the computation. When backward returns, every rank holds the
same averaged gradient, and the same AdamW step on the same weights keeps the copies identical:
no weight is ever sent again. The average of N per-rank mean gradients over B windows each is the
mean gradient over N·B windows: N processes with batch B train like one process with batch N·B.

Everything else a rank does is ordinary code; the trainer marks the few places that differ
(`distributed.` in azr_trainer.py and app/runs.py): rank 0 alone evaluates and writes files, the
others wait at a barrier where the order matters. Without torchrun the world is one process: no
process group, no wrapper, every helper here does nothing.
"""

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hardware import pick_device

# A rank that dies ends the job at once (torchrun stops the others). A rank that hangs ends it
# after this long: any collective — a gradient all-reduce, a barrier — raises instead of waiting
# forever. It must cover the longest work rank 0 does alone while the others wait: training the
# tokenizer and encoding the books on a model's first run, an evaluation, a checkpoint.
TIMEOUT = timedelta(minutes=30)


def launched():
    """True when torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def started(allowed=True):
    """Join the other ranks for the duration of the block (nothing to do in a single process).
    `allowed`: whether the command can run on several processes."""
    if not launched():
        yield
        return
    if not allowed:
        raise ValueError("only train, finetune and resume run on several processes; run this command without torchrun")
    # "cpu:gloo,cuda:nccl": CUDA tensors (gradients on GPUs) go through NCCL, CPU tensors
    # (gradients on CPUs, the small objects gathered for checkpoints) through gloo
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    # torchrun's default is one thread per process; give each its share of the cores instead,
    # never more: N processes with all cores each would fight over them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0: the one that evaluates, reports and writes."""
    return rank() == 0


def device_for_rank(requested="auto"):
    """The device of this rank: cuda:LOCAL_RANK on a GPU machine (one GPU per process), else the
    CPU; in a single process the usual choice (hardware.pick_device)."""
    if world_size() == 1:
        return pick_device(requested)
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"on several processes the device is auto, cuda or cpu (each process takes "
                         f"cuda:LOCAL_RANK), got {requested!r}")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        raise ValueError(f"process {local} of this machine has no GPU: it has {torch.cuda.device_count()}; "
                         f"start at most that many (--nproc_per_node) or pass --device cpu")
    torch.cuda.set_device(local)  # NCCL's work for this rank runs on its own GPU
    return torch.device("cuda", local)


# ----------------------------------------------------------------------------- the wrapper


def wrap(module):
    """`module` under DDP when there are several ranks, else `module` itself. The buffers (NF4's
    packed weights under QLoRA) are equal on every rank from the start and never change, so they
    are not broadcast again before every forward."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, forward_sync_buffers=False)


def no_sync(module, skip):
    """Inside it, backward leaves the gradients unreduced when `skip` (the micro-batches before
    the last of a gradient-accumulation step): one all-reduce of their sum per optimizer step."""
    return module.no_sync() if skip and isinstance(module, DistributedDataParallel) else nullcontext()


# ----------------------------------------------------------------------------- the other collectives


def mean(x):
    """The average of a number over the ranks (the loss of the global batch)."""
    if world_size() == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size()


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere. Every rank must call it."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    """Wait here until every rank arrives."""
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (and writes what it must); the others run it after, reading
    what rank 0 wrote."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def average_gradients(model):
    """All-reduce every parameter's gradient to its mean over the ranks, by hand: for a backward
    that did not go through the DDP wrapper (self-play's). A rank without a gradient adds zeros."""
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world_size()
