"""The engine: running a trained model to write text — KV cache, decoding copy, sampling, streaming.

Generating is two different workloads. The prompt goes through the model once, all its tokens
together ("prefill"): big matmuls, bound by FLOPs, exactly like training. After that each new
token is one row times every weight matrix ("decode"): 2 FLOPs per weight read from memory, so
a decode step is bound by how fast the weights stream in. Three things make it fast:

- a **KV cache**: the keys and values of past tokens never change, so each new token costs one
  row of attention instead of re-running the whole prefix;
- a **decoding copy** of the model (`decoding_copy`): the same modules, running the same
  `GPT.forward`, but every linear layer's weight stored (in, out) and cast once to the compute
  dtype — MKL's x @ W streams that layout faster than nn.Linear's x @ W.T over (out, in), and
  autocast no longer casts each weight on every token;
- **sampling from the candidates only**: top-k and top-p only ever keep a prefix of the best
  tokens, so torch.topk of k instead of a sort of the whole vocabulary, and the draw works on
  those k, never on a (B, V) tensor again.

Sampling follows the usual recipe: repetition penalty (CTRL, Keskar et al. 2019), temperature,
top-k, top-p "nucleus" (Holtzman et al. 2020). The engine works on token ids; `stream` is the one
place that turns them into text, whole UTF-8 characters at a time.
"""

import codecs
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

import config
from config import SEED_MAX, setting
from hardware import autocast


class KVCache:
    """Preallocated keys and values for every layer: L tensors (B, nh, T_max, hs) each.

    Preallocating means no torch.cat per token (which would copy the whole cache every step)."""

    def __init__(self, cfg, batch_size, device, dtype=torch.float32):
        shape = (batch_size, cfg.num_heads, cfg.max_seq_len, cfg.d_model // cfg.num_heads)
        # a tensor per layer: indexing one (L, ...) tensor per layer and token costs more than the copy
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.pos = 0  # tokens already cached

    def layer(self, i):
        return _LayerCache(self, i)

    def advance(self, T):
        self.pos += T


class _LayerCache:
    def __init__(self, cache, i):
        self.k, self.v, self.pos = cache.k[i], cache.v[i], cache.pos

    def append(self, k, v):
        """Store k, v (B, nh, T, hs) after the cached ones; -> every key and value so far (B, nh, S, hs)."""
        end = self.pos + k.size(2)
        keys, values = self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)
        keys.narrow(2, self.pos, k.size(2)).copy_(k)
        values.narrow(2, self.pos, v.size(2)).copy_(v)
        return keys, values


# ----------------------------------------------------------------------------- the decoding copy


def decoding_copy(model, dtype):
    """The model for generation: a copy that shares every parameter with `model` except the
    weights of its nn.Linear layers, which are cast once to `dtype` and stored transposed —
    F.linear's x @ W.T then reads a contiguous (in, out) matrix, which MKL streams faster than
    the (out, in) layout training uses. Its dropout layers are left out: at inference they return
    their input, yet each call still costs a trip through the dispatcher, per layer and token. A
    copy per generation, because training may change the weights between two of them. Run it under
    autocast for a lower-precision dtype, like the model."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fast = copy.deepcopy(model, shared)
    for m in list(fast.modules()):
        # LoRA's and NF4's layers keep their own weights. The head's (V, C) matrix streams as fast
        # in either layout (it is long enough for MKL to split), so in the weights' own dtype it
        # stays tied to wte: no copy of the largest matrix
        head_as_is = m is fast.lm_head and m.weight.dtype == dtype
        if type(m) is nn.Linear and not head_as_is:
            m.weight = nn.Parameter(m.weight.detach().t().to(dtype).contiguous().t(), requires_grad=False)
        for name, child in m.named_children():
            if type(child) is nn.Dropout:
                setattr(m, name, nn.Identity())
    return fast.eval()


def compute_dtype(model, device):
    """The dtype to decode in: autocast's when it is on (bf16 on GPUs and bf16 CPUs), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


# ----------------------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    max_new_tokens: int = setting(200, "tokens to write", 1, 10_000)
    temperature: float = setting(0.8, "0 = greedy (always the likeliest token); higher = more random", 0.0, 5.0)
    top_k: int = setting(50, "sample only from the k likeliest tokens (0 = off)", 0, 200_000)
    top_p: float = setting(0.95, "sample only from the likeliest tokens whose mass reaches p (1 = off)", 0.0, 1.0)
    repetition_penalty: float = setting(1.0, "push down tokens already in the text (1 = off)", 0.5, 5.0)
    seed: int | None = setting(None, "the same seed gives the same text (empty = random)", 0, SEED_MAX)
    stop: str | None = setting(None, "stop once the text contains this string")

    def validate(self):
        return config.validate(self)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seen=None):
    """Shape the next-token distribution: logits (B, V) -> filtered logits (B, V), -inf = never.

    The repetition penalty divides positive logits of tokens already seen by the penalty and
    multiplies negative ones; top-k keeps the k likeliest tokens; top-p keeps the smallest set
    whose probability reaches p — always at least the likeliest token."""
    kept, ids = candidates(logits, temperature, top_k, top_p, repetition_penalty, seen)
    if ids is None:
        return kept
    return torch.full_like(logits, float("-inf"), dtype=kept.dtype).scatter(1, ids, kept)


def candidates(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seen=None):
    """filter_logits without the (B, V) result: the tokens that can still be drawn and their
    logits, (kept (B, k), ids (B, k)), best first, -inf = never; (kept (B, V), None) when neither
    top-k nor top-p is on. Sampling needs only these k, so it never touches the whole vocabulary again."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        prev = logits.gather(1, seen)  # (B, S)
        penalized = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
        logits = logits.scatter(1, seen, penalized)  # a copy: the caller's logits stay as they are
    logits = logits / max(temperature, 1e-8)
    V = logits.size(-1)
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:
        return logits, None
    best, ids = torch.topk(logits, k, dim=-1)  # (B, k), descending: top-p then sorts only k values
    if top_p < 1.0:
        p = best.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass *before* this token already reaches p
        drop[:, 0] = False  # however small p is, the likeliest token stays
        best = best.masked_fill(drop, float("-inf"))
    return best, ids


def sample_next(logits, sc, seen=None, generator=None):
    """Pick the next token for each row of logits (B, V) -> (B, 1)."""
    if sc.temperature == 0:
        return filter_logits(logits, 1.0, 0, 1.0, sc.repetition_penalty, seen).argmax(-1, keepdim=True)
    kept, ids = candidates(logits, sc.temperature, sc.top_k, sc.top_p, sc.repetition_penalty, seen)
    probs = kept.softmax(-1)  # (B, k)
    if ids is not None:  # the candidates in vocabulary order, as they sit in the whole distribution:
        ids, order = ids.sort(-1)  # the same seed then draws the same token as over all V tokens
        probs = probs.gather(1, order)
    # inverse-CDF sampling: the first token whose cumulative probability reaches u ~ U(0, total];
    # a token of probability 0 adds nothing to the sum, so it can never be first. The same
    # distribution as torch.multinomial, which costs far more per call on CPU
    cdf = probs.cumsum(-1)  # (B, k)
    u = (1 - torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator)) * cdf[:, -1:]  # (B, 1)
    pick = torch.searchsorted(cdf, u)  # (B, 1)
    return pick if ids is None else ids.gather(1, pick)


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()  # no_grad, and no version counters or autograd checks per op either
def generate_ids(model, idx, sc, eos_id=None, dtype=None, n_tokens=None):
    """Yield (token_id, probs) for each new token after the prompt idx (1, T), with a KV cache.

    Only ids below `n_tokens` are drawn: a tokenizer can have fewer tokens than the model's
    vocab_size (BPE stops merging when no pair repeats), and the ids past it mean nothing.
    `probs` is the model's distribution over those ids before filtering, for token views. The prompt goes
    through the model in one forward ("prefill"); each new token then takes one more step with
    the cache. When the context fills up, the cache is rebuilt from the last half of it (a
    sliding window), so generation can run past max_seq_len."""
    cfg, device = model.config, idx.device
    gen = torch.Generator(device=device)
    if sc.seed is None:  # a random seed for this generator only: torch.seed() would re-seed the
        gen.seed()  # global RNG, which a training run in the same process draws its dropout from
    else:
        gen.manual_seed(sc.seed)
    dtype = dtype or compute_dtype(model, device)
    fast = decoding_copy(model, dtype)
    ids = idx[:, -cfg.max_seq_len:]
    with autocast(device, dtype):
        cache = KVCache(cfg, 1, device, dtype)
        logits = fast(ids, cache=cache)[0][:, -1, :n_tokens]  # (1, V)
        for _ in range(sc.max_new_tokens):
            nxt = sample_next(logits, sc, ids, gen)  # (1, 1)
            tok = nxt.item()
            yield tok, logits[0].float().softmax(-1)
            if tok == eos_id:
                return
            ids = torch.cat([ids, nxt], dim=1)
            if cache.pos >= cfg.max_seq_len:  # full: restart the cache from the recent half
                ids = ids[:, -(cfg.max_seq_len // 2):]
                cache = KVCache(cfg, 1, device, dtype)
                logits = fast(ids, cache=cache)[0][:, -1, :n_tokens]
            else:
                logits = fast(nxt, cache=cache)[0][:, -1, :n_tokens]


@torch.no_grad()  # not inference_mode: self-play trains on these ids
def rollouts(model, prompts, n_new, temperature=0.0, generator=None, ban=None):
    """Continue each prompt (N, P) by n_new tokens, all rows in one batch -> (N, n_new) ids:
    greedy at temperature 0, else sampled from softmax(logits / temperature).

    ban(rows) -> for each row, the tokens it may not take next (rows: the ids written so far);
    with it, the result is (ids, wanted): wanted (N, n_new) is the likeliest token where it was
    banned (for greedy rollouts: the token the row would have taken), -1 elsewhere."""
    cfg, device = model.config, prompts.device
    dtype = compute_dtype(model, device)
    fast = decoding_copy(model, dtype)
    sc = SamplingConfig(n_new, temperature=temperature, top_k=0, top_p=1.0)
    out, wanted, rows = [], [], [[] for _ in range(prompts.size(0))]
    with autocast(device, dtype):
        cache = KVCache(cfg, prompts.size(0), device, dtype)
        logits = fast(prompts, cache=cache)[0][:, -1]  # (N, V)
        for t in range(n_new):
            if ban:
                want = logits.argmax(-1, keepdim=True)  # (N, 1)
                logits = logits.float().clone()
                for r, banned in enumerate(ban(rows)):
                    logits[r, banned] = float("-inf")
            nxt = sample_next(logits, sc, generator=generator)  # (N, 1)
            if ban:
                wanted.append(torch.where(logits.gather(1, want).isinf(), want, -1))
                for r, x in enumerate(nxt[:, 0].tolist()):
                    rows[r].append(x)
            out.append(nxt)
            if t < n_new - 1:
                logits = fast(nxt, cache=cache)[0][:, -1]
    return (torch.cat(out, 1), torch.cat(wanted, 1)) if ban else torch.cat(out, 1)


def stream(model, tokenizer, prompt, sc, device="cpu"):
    """Yield (text, token_id, probs) as tokens are sampled. `text` is always whole UTF-8
    characters: bytes of a character split across tokens are held back until it is complete
    (then `text` is "" for the token that only began it). Stops at <|endoftext|> or `sc.stop`."""
    sc.validate()
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for tok, probs in generate_ids(model, idx, sc, eos_id=tokenizer.eot_id, n_tokens=tokenizer.vocab_size):
        if tok == tokenizer.eot_id:
            break
        piece = decoder.decode(tokenizer.token_bytes(tok))
        text += piece
        yield piece, tok, probs
        if sc.stop and sc.stop in text:
            return
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail, None, None


def generate(model, tokenizer, prompt, sc, device="cpu"):
    """The whole continuation as one string (cut at the stop string, if one is set)."""
    return joined(stream(model, tokenizer, prompt, sc, device), sc.stop)


def joined(pieces, stop=None):
    """The (text, token_id, probs) pieces of `stream` as one string, cut at `stop`."""
    text = "".join(piece for piece, _, _ in pieces)
    return text[: text.index(stop)] if stop and stop in text else text
