"""Speed tricks the trainer opts into. Each changes how fast a step runs, never what it computes.

1. **The chunked loss (`HeadLoss`, `TrainLoss`).** The logits are a training step's biggest
   tensor (small preset: 2048 rows x 5000 tokens, 41 MB in fp32, more than the weights and all
   other activations): written by the output matmul, read by the softmax, written again as their
   gradient, read by two more matmuls. Computed a chunk of 256 rows at a time, each chunk stays in
   the CPU's cache through all of that. The gradient of the mean cross-entropy with respect to the
   logits has a closed form, (softmax(logits) - onehot(target)) / N, so each chunk's share of the
   gradients is made right away and the chunk is dropped; backward only scales them. Never holding
   all the logits is also the idea of Cut Cross-Entropy (Wijmans et al. 2024) on GPUs.
2. **torch.compile** (`compile_loss`), where it pays: inductor fuses the elementwise work around
   the matmuls (LayerNorm, GELU, the softmax of attention written out) into a few loops.

BENCHMARKS.md measures each (`python bench.py`), as ratios against a peer in the same run.
"""

import os
import shutil

import torch
import torch.nn as nn

# "auto" compiles a CPU run whose matmul work is at least this many FLOPs: about a minute of
# eager training on 2 cores, enough to win back the compile time
COMPILE_MIN_FLOPS = 5e12
USER_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # read before inductor sets it itself


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the output layer, x (N, C) @ w (V, C)^T, over targets (N,) (-1 = skip),
    computed a chunk of rows at a time, with its gradients made in the same pass."""

    CHUNK = 256  # rows: 256 x 5000 fp32 logits is 5 MB, cache-sized

    @staticmethod
    def forward(ctx, x, w, targets):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # fp16's range would flush the small gradient entries to zero before GradScaler scales them
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        n = (targets != -1).sum().clamp(min=1)
        w_lo, w_grad = w.to(dtype), w.to(grad_dtype)  # cast once, not once per chunk
        total = torch.zeros((), device=x.device)
        dx = torch.empty_like(x)
        dw = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # frozen under LoRA
        with torch.autocast(device, enabled=False):
            for i in range(0, x.size(0), HeadLoss.CHUNK):
                xc, tc = x[i:i + HeadLoss.CHUNK], targets[i:i + HeadLoss.CHUNK]
                keep = (tc != -1)[:, None]  # (n, 1)
                tc = tc.clamp(min=0)[:, None]
                logp = (xc.to(dtype) @ w_lo.t()).float().log_softmax(-1)  # (n, C) x (C, V) -> (n, V)
                total -= (logp.gather(1, tc) * keep).sum()
                g = logp.exp_().scatter_add_(1, tc, -keep.float()).mul_(keep / n)  # (softmax - onehot) / N
                g = g.to(grad_dtype)
                dx[i:i + HeadLoss.CHUNK] = g @ w_grad  # (n, V) x (V, C)
                if dw is not None:
                    dw += (g.t() @ xc.to(grad_dtype)).float()  # (V, n) x (n, C)
        ctx.save_for_backward(dx, None if dw is None else dw.to(w.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, None if dw is None else dw * grad_loss, None


class TrainLoss(nn.Module):
    """model(idx, targets)[1] for training, without ever holding the (B, T, V) logits. A module,
    so that torch.compile and DistributedDataParallel can wrap the whole loss computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        x = self.model.features(idx)  # (B, T, C)
        return HeadLoss.apply(x.flatten(0, 1), self.model.lm_head.weight, targets.flatten())


def use_compile(setting, device, run_flops):
    """Whether to torch.compile the training loss. "auto" compiles on CPU for runs long enough to
    win back the compile time, and only with the C++ compiler inductor builds its kernels with.
    On CUDA, ask for it with "on"."""
    if setting != "auto":
        return setting == "on"
    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return device.type == "cpu" and has_cxx and run_flops >= COMPILE_MIN_FLOPS


def cache_compiles_in(folder):
    """Keep inductor's cache of compiled kernels in `folder` (the data folder's cache/), not in
    /tmp/torchinductor_<user>, unless the user chose a place with TORCHINDUCTOR_CACHE_DIR.
    Inductor reads the variable each time it compiles."""
    if USER_COMPILE_CACHE is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def compile_loss(loss, device, try_step):
    """torch.compile'd `loss` module, or `loss` itself with the reason when compiling fails.
    Compilation happens at the first call, so `try_step(compiled)` makes that call now (a
    forward and backward on a dummy batch): a missing C++ compiler or an op inductor cannot
    handle then means training eagerly, with a note, instead of a failed run."""
    if device.type == "cpu":  # inductor fuses the written-out attention; the fused CPU kernel is slow here
        for m in loss.modules():
            if hasattr(m, "fused"):
                m.fused = False
    compiled = torch.compile(loss)
    try:
        try_step(compiled)
    except Exception as e:  # any failure of the compiler means: run without it
        for m in loss.modules():
            if hasattr(m, "fused"):
                m.fused = True
        return loss, f"torch.compile failed, training without it: {str(e).strip()[:300]}"
    return compiled, None
