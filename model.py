"""The transformer: a GPT-2-style language model, written to be read.

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

This file is the network and nothing else. Running it to write text (KV cache, sampling) is
generate.py; the chunked training loss and torch.compile choices are speed.py.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from config import setting


@dataclass
class ModelConfig:
    # ranges: large enough for real experiments, small enough that a typo is a message, not a crash
    vocab_size: int = setting(5000, "different tokens the tokenizer knows: the 256 bytes, the merges it learns, "
                                    "an end-of-text token (<|endoftext|>)", 260, 200_000)
    d_model: int = setting(128, "width of each token's vector, the residual stream (C in the code)", 8, 8192)
    num_layers: int = setting(4, "transformer blocks stacked (L)", 1, 96)
    num_heads: int = setting(4, "attention heads per block; must divide d_model (nh)", 1, 128)
    d_ff: int = setting(512, "hidden width of the MLP (GPT-2: 4 x d_model)", 8, 32768)
    max_seq_len: int = setting(128, "the context: how many tokens the model sees at once (T_max)", 8, 8192)
    dropout: float = setting(0.0, "dropout on embeddings, attention and MLP outputs while training", 0.0, 0.9)

    def validate(self):
        """Raise SettingError with a message that says what to change."""
        config.validate(self)
        if self.d_model % self.num_heads:
            ok = [h for h in range(1, min(self.d_model, 128) + 1) if self.d_model % h == 0]
            raise config.SettingError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                                      f"try num_heads in {ok[-6:]}", "num_heads")
        return self

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return config.from_dict(cls, d, "config fields")


PRESETS = {
    # tiny is small with half the blocks and a smaller vocabulary: in a budget of a few minutes on a
    # CPU it takes twice the steps, and on a book of a few hundred kB or more a model that short of
    # training gains more from steps than from depth (BENCHMARKS.md, "Quality per minute against
    # nanoGPT's CPU recipe"); a smaller book is memorised before depth stops paying: use small
    "tiny": ModelConfig(1024, 128, 2, 4, 512, 128),
    "small": ModelConfig(5000, 128, 4, 4, 512, 128),
    "medium": ModelConfig(8000, 256, 6, 8, 1024, 256),
    "large": ModelConfig(15000, 512, 12, 16, 2048, 512),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # one fused kernel computes `attention` below without storing the (T, S) weights;
        # speed.py writes the formula out instead under torch.compile on CPU, where inductor fuses it
        self.fused = True

    def qkv(self, x, cache=None):
        """(B, T, C) -> q (B, nh, T, hs) and every key and value so far, k, v (B, nh, S, hs)."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3C) -> (B, T, 3, nh, hs)
        # split q, k, v and the heads: each head attends in its own hs-dim subspace
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # -> 3 x (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # the keys and values of the earlier tokens come from the cache
        return q, k, v

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cache)
        p = self.dropout if self.training else 0.0
        if self.fused:
            square = T == k.size(2)  # no cached tokens before these: the kernel builds the mask itself
            mask = None if square else causal_mask(T, k.size(2), x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=square, dropout_p=p)
        else:
            y, _ = attention(q, k, v, p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attention(q, k, v, dropout_p=0.0):
    """softmax(Q K^T / sqrt(hs) + causal mask) V (Vaswani et al. 2017, eq. 1), written out.
    Returns the output (B, nh, T, hs) and the attention weights (B, nh, T, S)."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, hs) x (B, nh, hs, S) -> (B, nh, T, S)
    mask = causal_mask(q.size(2), k.size(2), q.device)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    y = F.dropout(att, dropout_p) @ v  # (B, nh, T, S) x (B, nh, S, hs) -> (B, nh, T, hs)
    return y, att


def causal_mask(T, S, device):
    """(T, S) bool: True where query i, at absolute position S - T + i, may see key j <= S - T + i.
    None for a single new token: it may see every key."""
    if T == 1:
        return None
    return torch.arange(S, device=device)[None, :] <= torch.arange(S - T, S, device=device)[:, None]


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

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg, generator=None):
        """A model with fresh weights, drawn from `generator` (default: torch's global RNG)."""
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
        self.init_weights(generator)

    @torch.no_grad()
    def init_weights(self, generator=None):
        """N(0, 0.02) for every matrix, zero biases, LayerNorm gain 1 (GPT-2's init). Residual
        projections get std 0.02/sqrt(2L): each block adds two terms to the residual stream, and
        this keeps its variance from growing with depth (GPT-2 paper, §2.3)."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and name != "lm_head":  # lm_head is wte
                std = 0.02 / math.sqrt(2 * self.config.num_layers) if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std, generator=generator)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V) and, if targets (B, T) are given, the mean
        cross-entropy (targets of -1 are skipped). With a KV cache, idx continues the cached text."""
        logits = self.lm_head(self.features(idx, cache))  # (B, T, C) -> (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def features(self, idx, cache=None):
        """The network without its output layer: (B, T) ids -> (B, T, C), after ln_f."""
        x = self.embed(idx, cache.pos if cache is not None else 0)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.transformer.ln_f(x)

    def embed(self, idx, start=0):
        """Token + position embeddings of idx (B, T), whose first token sits at position `start`."""
        T = idx.size(1)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)

    @torch.no_grad()
    def attention_maps(self, idx):
        """What each token looks at: the attention weights of every layer, a list of (B, nh, T, T).
        The forward pass again, with the weights that the fused kernel never stores written out."""
        x = self.embed(idx)
        maps = []
        for block in self.transformer.h:
            maps.append(attention(*block.attn.qkv(block.ln_1(x)))[1])
            x = block(x)
        return maps
