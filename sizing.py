"""How big a model is before it exists: parameters, FLOPs per token, training memory — and
whether this machine can hold it.

The page shows these numbers live while a user types a config, and the store and the trainer
check them before they allocate anything, so an absurd config is a message, not a crash.
"""

import config
from files import StoreError
from hardware import available_memory

MAX_PARAMS = 2_000_000_000  # a config beyond this is a typo, whatever the machine
HEAD_CHUNK = 256  # rows of the output layer and loss computed at a time (speed.HeadLoss)
TRAIN_MEMORY_SHARE = 0.8  # a training step may plan on this share of the memory available now
CREATE_MEMORY_SHARE = 0.5  # a new model must train (one window per step) in this share of it


def block_matrices(cfg):
    """Weights in the linear layers' matrices of one block: c_attn (C x 3C), attn.c_proj (C x C),
    c_fc (C x F) and mlp.c_proj (F x C) — what Muon steps and bf16 autocast casts."""
    C, F_ = cfg.d_model, cfg.d_ff
    return 4 * C * C + 2 * C * F_


def param_count(cfg):
    """Parameters of the model, counted from the config (the head is tied to wte: no extra)."""
    C, F_ = cfg.d_model, cfg.d_ff
    gains_and_biases = 2 * C + 3 * C + C + 2 * C + F_ + C  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj
    per_block = block_matrices(cfg) + gains_and_biases
    return cfg.vocab_size * C + cfg.max_seq_len * C + cfg.num_layers * per_block + 2 * C


def flops_per_token(cfg, seq_len=None):
    """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention's
    QK^T and AV, 12 * L * T * C (PaLM, Chowdhery et al. 2022, appendix B)."""
    T = seq_len or cfg.max_seq_len
    n_matmul = param_count(cfg) - cfg.max_seq_len * cfg.d_model  # position lookups are free
    return 6 * n_matmul + 12 * cfg.num_layers * T * cfg.d_model


def memory_estimate(cfg, batch_size=16, seq_len=None, bytes_per_act=4, compiled=False, optimizer="adamw"):
    """Peak memory of one training step in bytes, counted from what this code keeps alive.

    Before the step: fp32 weights (4 bytes per parameter) and the optimizer's state: AdamW's two
    moments (8), or for Muon one momentum (4) per weight of the blocks' matrices and AdamW's two
    moments for the rest (muon.muon_groups); "adamw", the larger, is the default. The peak
    comes late in the forward, inside the chunked loss, before any gradient exists, so the
    gradients (4 per parameter, alive only after the activations are freed) count only if larger.
    At that moment autograd holds, per token and block: the block's input and its post-attention
    residual (read by the LayerNorms' backward), the two LayerNorm outputs (the next Linear's
    input), q, k, v and the attention output (the fused kernel keeps no T x T weights), and the
    MLP's hidden layer before and after GELU: 8C + 2F values, 4 bytes each in fp32; under bf16
    autocast the residuals stay fp32 and the rest is bf16, 8C + 2(6C + 2F) bytes (Korthikanti et
    al. 2022 count the same tensors for a GPU kernel set). On top: the final LayerNorm's input
    and output and the loss's dx (3C fp32 per token), its fp32 dw (V x C) and two (HEAD_CHUNK, V)
    chunks; bf16 adds autocast's copy of every weight. Compiled attention is written out and
    keeps its (T, T) weights per head: + L * B * nh * T^2 values."""
    T, B, C, F_, L, V = seq_len or cfg.max_seq_len, batch_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.vocab_size
    N, n = B * T, param_count(cfg)
    low = bytes_per_act < 4
    per_token = 8 * C + 2 * (6 * C + 2 * F_) if low else 4 * (8 * C + 2 * F_)
    acts = L * N * per_token + 4 * (3 * N * C + V * C + 2 * HEAD_CHUNK * V)
    casts = bytes_per_act * (V * C + L * block_matrices(cfg)) if low else 0  # the head and every Linear
    if compiled:
        acts += L * B * cfg.num_heads * T * T * bytes_per_act
    matrices = L * block_matrices(cfg) if optimizer == "muon" else 0  # Muon's share of the weights
    state = 4 * matrices + 8 * (n - matrices)
    est = {"weights": 4 * n + casts, "grads": 4 * n, "optimizer_state": state, "activations": int(acts)}
    est["total"] = est["weights"] + est["optimizer_state"] + max(est["activations"], est["grads"])
    return est


def check_fits_in_memory(cfg):
    """The store's policy for a new model: it must be trainable on this machine. Refuse one over
    MAX_PARAMS, or whose training step at batch size 1 and its full context (weights, gradients,
    AdamW, activations: memory_estimate) needs more than CREATE_MEMORY_SHARE of the memory
    available here, before its weights are allocated and written."""
    n = param_count(cfg)
    if n > MAX_PARAMS:
        raise StoreError(f"this config has {n:,} parameters; the limit is {MAX_PARAMS:,}")
    need, free = memory_estimate(cfg, batch_size=1)["total"], available_memory()
    if free is not None and need > CREATE_MEMORY_SHARE * free:
        raise StoreError(
            f"this config ({n:,} parameters) needs about {gib(need)} GiB to train even one window of "
            f"{cfg.max_seq_len} tokens per step, more than {CREATE_MEMORY_SHARE:.0%} of the {gib(free)} GiB "
            f"available here; the store only creates models this machine can train: make it smaller")


def check_training_memory(cfg, batch_size, seq_len=None, precision="fp32", device=None, optimizer="adamw"):
    """Refuse a training step that would not fit: its memory_estimate (at 2 bytes per activation
    under bf16/fp16 autocast, 4 in fp32) against TRAIN_MEMORY_SHARE of what `device` has available
    now. Run before the job starts, so the user gets the numbers instead of the OOM killer."""
    T = seq_len or cfg.max_seq_len
    need = memory_estimate(cfg, batch_size, T, 2 if precision in ("bf16", "fp16") else 4, optimizer=optimizer)["total"]
    free = available_memory(device)
    if free is not None and need > TRAIN_MEMORY_SHARE * free:
        raise StoreError(
            f"a training step of batch_size {batch_size} x seq_len {T} on this model needs about {gib(need)} GiB "
            f"({precision}, see /estimate), more than {TRAIN_MEMORY_SHARE:.0%} of the {gib(free)} GiB available "
            f"here; lower batch_size or seq_len (grad_accum keeps the tokens per step)")


def window_len(tc, cfg):
    """Tokens per training window: seq_len, or the model's whole context when it is 0. Never
    more than the context: positions past max_seq_len have no embedding to look up."""
    T = tc.seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise config.SettingError(f"seq_len {T} is longer than the model's context (max_seq_len {cfg.max_seq_len}); "
                                  f"use at most {cfg.max_seq_len}, or 0 for the whole context", "seq_len")
    return T


def gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f}"
