"""The transformer: a GPT-2-style language model written to be read, plus KV-cache generation.

A language model predicts the next token from the ones before it. GPT-2 (Radford et al. 2019)
does it with a stack of identical blocks over a sequence of vectors:

    x = wte[tokens] + wpe[positions]                 # what each token is, and where it is
    for each block:  x = x + attn(ln_1(x))           # tokens look at earlier tokens
                     x = x + mlp(ln_2(x))            # each token thinks on its own
    logits = ln_f(x) @ wte.T                         # the same table reads words in and out

The LayerNorm sits *before* each sub-layer ("pre-LN"), so the residual stream x is a clean sum
that gradients flow through unchanged; that is what lets deep stacks train without warm-up
tricks. State-dict names follow GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...), so exporting
to the Hugging Face layout is a rename (HF's Conv1D stores the same matrices transposed).

Generation keeps a **KV cache**: the keys and values of past tokens never change, so each new
token costs one row of attention instead of re-running the whole prefix.

Two places trade a little code for a lot of speed, each with its measurement next to it:
`HeadLoss` computes the output layer and the training loss in cache-sized chunks, and
`decode_step` runs one new token over weights laid out for reading, not for training.
"""

import codecs
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

# Guard rails for user-typed configs: large enough for real experiments, small enough that a typo
# (d_model=10**9) is an error message instead of an out-of-memory crash.
LIMITS = {
    "vocab_size": (260, 200_000),  # byte-level BPE needs the 256 bytes plus special tokens
    "d_model": (8, 8192),
    "num_layers": (1, 96),
    "num_heads": (1, 128),
    "d_ff": (8, 32768),
    "max_seq_len": (8, 8192),
}
MAX_PARAMS = 2_000_000_000


@dataclass
class ModelConfig:
    vocab_size: int = 5000
    d_model: int = 128  # C: width of the residual stream
    num_layers: int = 4  # L: number of blocks
    num_heads: int = 4  # nh: attention heads; head size hs = d_model // num_heads
    d_ff: int = 512  # hidden width of the MLP (GPT-2 uses 4 * d_model)
    max_seq_len: int = 128  # T_max: context length, also the size of the position table
    dropout: float = 0.0

    def validate(self):
        """Raise ValueError with a message that says what to change."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "dropout":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                    raise ValueError(f"dropout must be a number in [0, 1), got {v!r}")
                continue
            lo, hi = LIMITS[f.name]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{f.name} must be a whole number, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"{f.name} must be between {lo} and {hi}, got {v}")
        if self.d_model % self.num_heads:
            ok = [h for h in range(1, min(self.d_model, 128) + 1) if self.d_model % h == 0]
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                f"try num_heads in {ok[-6:]}"
            )
        n = param_count(self)
        if n > MAX_PARAMS:
            raise ValueError(f"this config has {n:,} parameters; the limit is {MAX_PARAMS:,}")
        return self

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d).validate()


PRESETS = {
    "small": ModelConfig(5000, 128, 4, 4, 512, 128),
    "medium": ModelConfig(8000, 256, 6, 8, 1024, 256),
    "large": ModelConfig(15000, 512, 12, 16, 2048, 512),
}


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


# ----------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, explain=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # split the channels into heads: each head attends in its own hs-dim subspace
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # (B, T, C) -> (B, nh, T, hs)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.append(k, v)  # (B, nh, start+T, hs): every key so far
        if explain:
            y, att = explicit_attention(q, k, v, start)
        elif self._write_out(q, k):
            y, att = explicit_attention(q, k, v, start, self.dropout if self.training else 0.0)[0], None
        else:
            y, att = self._sdpa(q, k, v, start), None
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y)), att

    def _write_out(self, q, k):
        """Under torch.compile on CPU, attention written out beats the fused kernel: inductor fuses
        the mask and softmax into the loops around the two matmuls, while PyTorch's CPU flash kernel
        is slow at small head sizes (bench.py, 2 EPYC cores, train tokens/s vs the peer: small bf16
        1.57x -> 2.23x, medium bf16 1.40x -> 1.83x, fp32 within noise). It keeps the (T, S) weights
        for backward, so only up to S = 1024 keys."""
        return torch.compiler.is_compiling() and q.device.type == "cpu" and k.size(2) <= 1024

    def _sdpa(self, q, k, v, start):
        """Fused kernel; computes exactly `explicit_attention` (tested), without storing att."""
        T = q.size(2)
        p = self.dropout if self.training else 0.0
        if T == 1:  # one new token sees every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        if start == 0:  # square causal mask: the kernel builds it itself
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, start, q.device), dropout_p=p)


def causal_mask(T, start, device):
    """(T, start+T) bool: query i (absolute position start+i) may see keys 0..start+i."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    return k_pos <= q_pos


def explicit_attention(q, k, v, start=0, dropout_p=0.0):
    """softmax(Q K^T / sqrt(hs) + mask) V, written out (Vaswani et al. 2017, eq. 1).
    Returns the output and the attention weights (B, nh, T, S) for teaching views."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, hs) x (B, nh, hs, S) -> (B, nh, T, S)
    att = att.masked_fill(~causal_mask(q.size(2), start, q.device), float("-inf"))
    att = F.softmax(att, dim=-1)
    y = F.dropout(att, dropout_p) @ v if dropout_p else att @ v  # (B, nh, T, S) x (B, nh, S, hs) -> (B, nh, T, hs)
    return y, att


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU (Hendrycks & Gimpel 2016)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, explain=False):
        a, att = self.attn(self.ln_1(x), cache, explain)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg.validate()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            wpe=nn.Embedding(cfg.max_seq_len, cfg.d_model),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers)),
            ln_f=nn.LayerNorm(cfg.d_model),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the output layer reuses the embedding table, which
        # saves V*C parameters and trains both from every token
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # scale residual projections by 1/sqrt(2*L): each block adds two terms to the residual
        # stream, and this keeps its variance from growing with depth (GPT-2 paper, §2.3)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, cache=None, explain=False):
        """idx (B, T) token ids -> logits (B, T, V); loss if targets (B, T) are given.
        With `cache`, idx continues the cached sequence; with `explain`, also returns the
        attention weights of every layer as a list of (B, nh, T, S)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        atts = []
        for i, block in enumerate(self.transformer.h):
            x, att = block(x, cache.layer(i) if cache is not None else None, explain)
            atts.append(att)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if targets is not None and torch.is_grad_enabled() and not explain:
            # training: the head and the loss in chunks of rows, never the whole (B, T, V) logits
            return None, HeadLoss.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if explain:
            return logits, loss, atts
        return logits, loss


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the output layer, x (N, C) @ w (V, C)^T, over targets (N,) (-1 = skip),
    computed a chunk of rows at a time, with its gradients.

    The logits are a training step's biggest tensor (small preset: 2048 rows x 5000 = 41 MB in
    fp32, more than the weights and all other activations), written by the matmul, read by the
    softmax, written again as their gradient, read by two more matmuls. A chunk of 256 rows
    (5 MB) stays in the CPU's cache through all of that. The gradient of the mean cross-entropy
    with respect to the logits has a closed form, (softmax(logits) - onehot(target)) / N, so each
    chunk's part of dx and dw is made right away and the chunk is dropped; backward only scales
    them by the incoming gradient. Never holding all the logits is also the point of Cut
    Cross-Entropy (Wijmans et al. 2024) on GPUs, where it saves memory more than time. Measured
    (bench.py's train rows without and with it, 2 EPYC cores, ours/peer): small fp32 1.20x -> 1.52x,
    medium bf16 1.89x -> 2.26x; peak memory of a small fp32 step 216 -> 117 MB. Chunks of 128,
    512, 1024 rows or the whole batch were slower than 256 (BENCHMARKS.md)."""

    CHUNK = 256

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
                logp = (xc.to(dtype) @ w_lo.t()).float().log_softmax(-1)  # (n, V)
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


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for every layer: (L, B, nh, T_max, hs) each.

    Preallocating means no torch.cat per token (which would copy the whole cache every step)."""

    def __init__(self, cfg, batch_size, device, dtype=torch.float32):
        shape = (cfg.num_layers, batch_size, cfg.num_heads, cfg.max_seq_len, cfg.d_model // cfg.num_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def layer(self, i):
        return _LayerCache(self, i)

    def advance(self, T):
        self.pos += T


class _LayerCache:
    def __init__(self, cache, i):
        self.cache, self.i, self.pos = cache, i, cache.pos

    def append(self, k, v):
        c, end = self.cache, self.pos + k.size(2)
        c.k[self.i, :, :, self.pos:end] = k
        c.v[self.i, :, :, self.pos:end] = v
        return c.k[self.i, :, :, :end], c.v[self.i, :, :, :end]


# ----------------------------------------------------------------------------- decoding
#
# Generating is two different workloads. The prompt goes through the model once, all its tokens
# together ("prefill"): big matmuls, bound by FLOPs, exactly like training. After that each new
# token is one row times every weight matrix ("decode"): 2 FLOPs per weight read from memory, so
# a decode step is bound by how fast the weights stream in, and by Python's per-op overhead.
# The decode step below is GPT.forward's math for one token (tested equal), with two changes that
# only pay at batch 1 (bench.py, 2 EPYC cores, fp32 tokens/s: small 1,744 -> 2,852, medium 505 -> 606):
# - each matrix stored (in, out): MKL's x @ W streams it twice as fast as nn.Linear's x @ W.T
#   over the (out, in) layout (12.9 -> 27 GB/s for the 8000 x 256 head, cold caches);
# - weights cast once to the compute dtype, instead of autocast casting each on every token.


def pack_for_decoding(model, dtype):
    """The weights a decode step reads, laid out for it; None for a model with LoRA layers.
    A copy, made per generation: training may change the weights between two generations."""
    linears = [m for name, m in model.named_modules() if name.endswith(("c_attn", "c_proj", "c_fc"))]
    if any(type(m) is not nn.Linear for m in linears):
        return None

    def mat(lin):  # (out, in) -> (in, out) and its bias
        return lin.weight.detach().t().to(dtype).contiguous(), lin.bias.detach().to(dtype)

    def norm(ln):
        return ln.weight.detach(), ln.bias.detach()  # LayerNorm stays in fp32, as under autocast

    tr = model.transformer
    return {
        "wte": tr.wte.weight.detach(), "wpe": tr.wpe.weight.detach(), "ln_f": norm(tr.ln_f),
        "lm_head": model.lm_head.weight.detach().t().to(dtype).contiguous(),  # (C, V): wte, tied
        "h": [{"ln_1": norm(b.ln_1), "c_attn": mat(b.attn.c_attn), "attn.c_proj": mat(b.attn.c_proj),
               "ln_2": norm(b.ln_2), "c_fc": mat(b.mlp.c_fc), "mlp.c_proj": mat(b.mlp.c_proj)} for b in tr.h],
    }


def decode_step(model, w, idx, cache):
    """The next token of each row, idx (B, 1), through the model with weights `w` from
    pack_for_decoding -> logits (B, V); the same as model(idx, cache=cache)[0][:, -1]."""
    if w is None:  # a model with LoRA layers: the plain forward knows how to run them
        return model(idx, cache=cache)[0][:, -1]
    C, nh = model.config.d_model, model.config.num_heads
    B, pos, dt = idx.size(0), cache.pos, w["lm_head"].dtype

    def ln(x, wb):  # normalise in fp32, then go down to the compute dtype for the matmul
        return F.layer_norm(x, (C,), *wb).to(dt)

    def linear(x, wb):
        return torch.addmm(wb[1], x, wb[0])  # bias + x @ W, with W stored (in, out)

    if pos >= model.config.max_seq_len:
        raise ValueError(f"the cache is full: max_seq_len={model.config.max_seq_len}")
    # casts are written out, so autocast has nothing left to do but look at every op
    with torch.autocast(idx.device.type, enabled=False):
        x = w["wte"][idx[:, 0]] + w["wpe"][pos]  # (B, C), the residual stream in fp32
        for i, layer in enumerate(w["h"]):
            q, k, v = linear(ln(x, layer["ln_1"]), layer["c_attn"]).view(B, 3, nh, 1, C // nh).unbind(1)
            k, v = cache.layer(i).append(k, v)  # (B, nh, pos+1, hs): the new token sees every key
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
            x = x + linear(y.reshape(B, C), layer["attn.c_proj"])
            x = x + linear(F.gelu(linear(ln(x, layer["ln_2"]), layer["c_fc"]), approximate="tanh"), layer["mlp.c_proj"])
        cache.advance(1)
        return ln(x, w["ln_f"]) @ w["lm_head"]  # (B, C) x (C, V) -> (B, V)


# ----------------------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: str | None = None  # stop once the text contains this string

    def validate(self):
        checks = [
            (1 <= self.max_new_tokens <= 10_000, "max_new_tokens must be between 1 and 10000"),
            (0 <= self.temperature <= 5, "temperature must be between 0 and 5 (0 = greedy)"),
            (0 <= self.top_k <= 200_000, "top_k must be between 0 and 200000 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 = off)"),
            (0.5 <= self.repetition_penalty <= 5, "repetition_penalty must be between 0.5 and 5 (1 = off)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seen=None):
    """Shape the next-token distribution. logits (B, V) -> filtered logits (B, V).

    repetition penalty (CTRL, Keskar et al. 2019): divide positive logits of already-seen
    tokens by the penalty, multiply negative ones; top-k keeps the k most likely tokens;
    top-p, "nucleus" (Holtzman et al. 2020), keeps the smallest set whose mass reaches p."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        prev = logits.gather(1, seen)  # (B, S)
        logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    logits = logits / max(temperature, 1e-8)
    V = logits.size(-1)
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:
        return logits
    # both filters keep a prefix of the tokens ranked by logit, so rank only the k best: topk(50)
    # instead of sorting all V is ~100x cheaper per token (bench.py, V=5000)
    best, order = torch.topk(logits, k, dim=-1)  # (B, k), descending
    if top_p < 1.0:
        p = best.softmax(-1)
        best = best.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf"))  # mass *before* it already >= p
    return torch.full_like(logits, float("-inf")).scatter(1, order, best)


def sample_next(logits, sc, seen=None, generator=None):
    """Pick the next token for each row of logits (B, V) -> (B, 1)."""
    if sc.temperature == 0:
        return filter_logits(logits, 1.0, 0, 1.0, sc.repetition_penalty, seen).argmax(-1, keepdim=True)
    probs = filter_logits(logits, sc.temperature, sc.top_k, sc.top_p, sc.repetition_penalty, seen).softmax(-1)
    # inverse-CDF sampling: the first token whose cumulative probability reaches u ~ U(0, total];
    # a token of probability 0 adds nothing to the sum, so it can never be first. Same distribution
    # as torch.multinomial, which on CPU costs ~0.5 ms per call at V=5000, ~70x more
    cdf = probs.cumsum(-1)  # (B, V)
    u = (1 - torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator)) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u)


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_ids(model, idx, sc, eos_id=None, cache_dtype=None):
    """Yield (token_id, probs) for each new token after the prompt idx (1, T), with a KV cache.

    `probs` is the model's distribution (V,) before filtering, for token views. The prompt goes
    through the model in one forward ("prefill"); each new token then takes one `decode_step`.
    When the context fills up, the cache is rebuilt from the last half of it (a sliding window)."""
    model.eval()
    cfg, device = model.config, idx.device
    gen = torch.Generator(device=device)
    if sc.seed is None:  # a random seed for this generator only: torch.seed() would re-seed the
        gen.seed()  # global RNG, which a training run in the same process draws its dropout from
    else:
        gen.manual_seed(sc.seed)
    dtype = cache_dtype or compute_dtype(model, device)
    w = pack_for_decoding(model, dtype)
    ids = idx[:, -cfg.max_seq_len:]
    cache = KVCache(cfg, 1, device, dtype)
    logits = model(ids, cache=cache)[0][:, -1]  # (1, V)
    for _ in range(sc.max_new_tokens):
        nxt = sample_next(logits, sc, ids, gen)  # (1, 1)
        yield nxt.item(), logits[0].float().softmax(-1)
        if eos_id is not None and nxt.item() == eos_id:
            return
        ids = torch.cat([ids, nxt], dim=1)
        if cache.pos >= cfg.max_seq_len:  # full: restart the cache from the recent half
            ids = ids[:, -(cfg.max_seq_len // 2):]
            cache = KVCache(cfg, 1, device, dtype)
            logits = model(ids, cache=cache)[0][:, -1]
        else:
            logits = decode_step(model, w, nxt, cache)


def compute_dtype(model, device):
    """The dtype k and v come out in: autocast's when it is on, else the weights'. An fp32 cache
    under bf16 autocast costs twice the memory and a cast of every cached key and value on
    every token (small preset, bf16, 2 EPYC cores: 1145 -> 1201 tokens/s)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def stream(model, tokenizer, prompt, sc, device="cpu"):
    """Yield dicts {text, token, prob, top} as tokens are sampled; `text` is always whole
    UTF-8 characters: bytes of a character split across tokens are held back until complete."""
    sc.validate()
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for tok, probs in generate_ids(model, idx, sc, eos_id=tokenizer.eot_id):
        if tok == tokenizer.eot_id:
            break
        piece = decoder.decode(tokenizer.token_bytes(tok))
        text += piece
        top = torch.topk(probs, 5)
        yield {
            "text": piece, "token": tok, "prob": probs[tok].item(),
            "top": [[tokenizer.decode([i]), p] for i, p in zip(top.indices.tolist(), top.values.tolist())],
        }
        if sc.stop and sc.stop in text:
            return
    tail = decoder.decode(b"", final=True)
    if tail:
        yield {"text": tail, "token": None, "prob": None, "top": []}


def generate(model, tokenizer, prompt, sc, device="cpu"):
    """The whole continuation as one string (cut at the stop string, if one is set)."""
    text = "".join(piece["text"] for piece in stream(model, tokenizer, prompt, sc, device))
    if sc.stop and sc.stop in text:
        text = text[: text.index(sc.stop)]
    return text
