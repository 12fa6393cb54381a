"""How big a model is before it exists: parameters, FLOPs per token, training memory — and
whether this machine can hold it.

The page shows these numbers live while a user types a config, and the store and the trainer
check them before they allocate anything, so an absurd config is a message, not a crash.
"""

import os

from files import StoreError

MAX_PARAMS = 2_000_000_000  # a config beyond this is a typo, whatever the machine


def param_count(cfg):
    """Parameters of the model, counted from the config (the head is tied to wte: no extra)."""
    C, F_, L = cfg.d_model, cfg.d_ff, cfg.num_layers
    per_block = (
        2 * C  # ln_1
        + C * 3 * C + 3 * C  # c_attn
        + C * C + C  # attn.c_proj
        + 2 * C  # ln_2
        + C * F_ + F_  # c_fc
        + F_ * C + C  # mlp.c_proj
    )
    return cfg.vocab_size * C + cfg.max_seq_len * C + L * per_block + 2 * C


def flops_per_token(cfg, seq_len=None):
    """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention's
    QK^T and AV, 12 * L * T * C (PaLM, Chowdhery et al. 2022, appendix B)."""
    T = seq_len or cfg.max_seq_len
    n_matmul = param_count(cfg) - cfg.max_seq_len * cfg.d_model  # position lookups are free
    return 6 * n_matmul + 12 * cfg.num_layers * T * cfg.d_model


def memory_estimate(cfg, batch_size=16, seq_len=None, bytes_per_act=4):
    """Rough training memory in bytes: weights, gradients, AdamW's two moments, activations.

    Activations per block follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"),
    34*B*T*C + 5*B*nh*T^2 bytes at 2 bytes per value, scaled here to `bytes_per_act`; the
    logits (B, T, V) are counted twice: the values and the softmax gradient."""
    T, B, C = seq_len or cfg.max_seq_len, batch_size, cfg.d_model
    n = param_count(cfg)
    per_block = (34 * B * T * C + 5 * B * cfg.num_heads * T * T) * bytes_per_act / 2
    acts = cfg.num_layers * per_block + 2 * B * T * cfg.vocab_size * bytes_per_act
    est = {"weights": 4 * n, "grads": 4 * n, "adam": 8 * n, "activations": int(acts)}
    est["total"] = sum(est.values())
    return est


def check_fits_in_memory(cfg):
    """Refuse a model too big to train: over MAX_PARAMS, or whose training state (weights, grads,
    AdamW: 16 bytes a parameter) would take more than half of the memory free here."""
    n = param_count(cfg)
    if n > MAX_PARAMS:
        raise StoreError(f"this config has {n:,} parameters; the limit is {MAX_PARAMS:,}")
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no cheap reading, trust the limits
        return
    need = 16 * n
    if need > free / 2:
        raise StoreError(f"this config needs about {need / 2**30:.1f} GiB to train ({n:,} parameters), "
                         f"more than half of the {free / 2**30:.1f} GiB free here; make it smaller")
