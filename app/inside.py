"""Looking inside a model: the numbers behind the page's teaching views.

Each function takes a model (or only its tokenizer) and what to look at — a prompt, a book, a
layer — and returns plain data for one view; the web layer only serialises it. Nothing here
trains or changes a model.

- attention_map    which earlier tokens each token looks at, in one layer.
- tokenizer_view   a text cut into tokens: ids, bytes per token, how much of a book the 100
                   commonest tokens cover, the longest merges BPE learned (Sennrich et al. 2016).
- next_token_view  the next-token distribution for a prompt, before and after the sampling
                   filters — the same generate.filter_logits that sample_next draws through.
- embedding_map    the embeddings (rows of wte) of a book's commonest tokens on their first two
                   principal components (PCA): tokens the model treats alike sit close together.
- nf4_view         one layer's weights in NF4 (quant.py, QLoRA §3): the 16 levels on the weights'
                   histogram, the reconstruction error, bits and bytes.
- run_curves       the loss and val bits/byte curves of every run of some models, with settings.
"""

import copy
from collections import defaultdict

import numpy as np
import torch

import quant
from files import NotFound
from generate import filter_logits
from tokenizer import prepare_tokens

ATTENTION_MAX_TOKENS = 64  # a 64 x 64 heatmap is still readable; longer prompts keep their end
TOKENS_SHOWN = 2000  # chunks a page can show; the counts cover the whole text
BOOK_TEXT_SHOWN = 400  # characters of a book cut into chunks when no text is given
LONGEST_MERGES = 12
COMMON_TOKENS = 100
CURVE_POINTS = 400  # train-loss points per run: longer runs are averaged in windows of steps


@torch.no_grad()
def attention_map(model, tok, prompt, layer, head=None):
    """Which earlier tokens each token of `prompt` attends to, in one layer: (T, T) weights of
    one head, or their mean over heads (head=None)."""
    cfg = model.config
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer must be between 0 and {cfg.num_layers - 1}")
    if head is not None and not 0 <= head < cfg.num_heads:
        raise ValueError(f"head must be between 0 and {cfg.num_heads - 1} (or null for the mean of all heads)")
    ids = tok.encode(prompt)[-min(ATTENTION_MAX_TOKENS, cfg.max_seq_len):]
    if not ids:
        raise ValueError("type a prompt first: attention needs at least one token")
    device = next(model.parameters()).device
    att = model.attention_maps(torch.tensor([ids], device=device))[layer][0]  # (nh, T, T)
    att = att.mean(0) if head is None else att[head]  # (T, T)
    return {"tokens": [tok.decode([i]) for i in ids], "layer": layer, "head": head,
            "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "attention": [[round(v, 4) for v in row] for row in att.tolist()]}


def top_alternatives(tok, probs, k=5):
    """The k likeliest tokens of a distribution probs (V,) as [[text, probability], ...]."""
    top = torch.topk(probs, k)
    return [[tok.decode([i]), p] for i, p in zip(top.indices.tolist(), top.values.tolist())]


def selfplay_rollout(example, tok):
    """A self-play rollout (selfplay.example) as text: the prompt, then each written token with,
    where self-play blocked a repeat, the token greedy wanted there — the one it pushed down."""
    return {"prompt": tok.decode(example["prompt"]),
            "tokens": [{"text": tok.decode([t]), "pushed_down": tok.decode([w]) if w >= 0 else None}
                       for t, w in zip(example["tokens"], example["pushed_down"])]}


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_view(store, tok, text="", book=None):
    """`text` (or, without one, the start of `book`) cut into tokens, with bytes per token; with
    a book also the book's own numbers: its tokens, bytes per token, the share of it that its
    COMMON_TOKENS commonest tokens cover. Always the longest merges the tokenizer learned."""
    if not text and book:
        text = store.books.text(book)[:BOOK_TEXT_SHOWN]
    if not text:
        raise ValueError("paste a text or pick a book to cut into tokens")
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": [{"id": i, "text": shown_bytes(tok.token_bytes(i))} for i in ids[:TOKENS_SHOWN]],
            "n_tokens": len(ids), "n_bytes": n_bytes, "bytes_per_token": n_bytes / max(1, len(ids)),
            "shown": min(len(ids), TOKENS_SHOWN), "vocab_size": tok.vocab_size,
            "book": book_numbers(store, tok, book) if book else None, "longest_merges": longest_merges(tok)}


def book_numbers(store, tok, book):
    """How `tok` cuts a whole book: tokens, bytes per token, and how much of the book its
    commonest tokens cover (a few hundred tokens usually make up half of any text: Zipf)."""
    counts = token_counts(store, tok, book)
    n_tokens = int(counts.sum())
    order = np.argsort(-counts, kind="stable")
    top = order[:COMMON_TOKENS]
    return {"name": book, "n_tokens": n_tokens, "n_bytes": int(counts @ tok.byte_lengths()),
            "bytes_per_token": float(counts @ tok.byte_lengths()) / n_tokens,
            "common_tokens": COMMON_TOKENS, "common_share": float(counts[top].sum()) / n_tokens,
            "commonest": [[shown_bytes(tok.token_bytes(int(i))), float(counts[i]) / n_tokens] for i in order[:10]]}


def token_counts(store, tok, book):
    """How often each token id occurs in the stored `book`, cut by `tok`: (V,) int64. The token
    arrays are cached on disk (tokenizer.prepare_tokens), so a second look is instant."""
    data = prepare_tokens(tok, {book: store.books.text(book)}, store.home / "cache" / "tokens")
    counts = sum(np.bincount(np.asarray(data[s]), minlength=tok.vocab_size) for s in ("train", "val"))
    return counts[:tok.vocab_size]


def longest_merges(tok, n=LONGEST_MERGES):
    """The merges whose result is longest in bytes: whole words the book used often enough
    that BPE gave them one id. `rank` is when it was learned (1 = the first merge)."""
    merges = [(len(a + b), rank, a, b) for rank, (a, b) in enumerate(tok.merges(), 1)]
    return [{"rank": rank, "left": shown_bytes(a), "right": shown_bytes(b), "result": shown_bytes(a + b)}
            for _, rank, a, b in sorted(merges, key=lambda m: (-m[0], m[1]))[:n]]


def shown_bytes(b):
    """A token's bytes as text; bytes that are only part of a UTF-8 character (byte-level BPE
    can cut a character in two) are shown as \\xNN."""
    return b.decode("utf-8", errors="backslashreplace")


# ----------------------------------------------------------------------------- next token


@torch.no_grad()
def next_token_view(model, tok, prompt, sc, bars=20):
    """The next-token distribution after `prompt`: for the likeliest tokens, the model's own
    probability (softmax of the logits) and the probability sampling with `sc` gives them —
    through generate.filter_logits, exactly as sample_next does — and which filter cut each
    token it cut. At temperature 0 sampling is greedy: all the mass goes to one token."""
    ids = (tok.encode(prompt) or [tok.eot_id])[-model.config.max_seq_len:]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(idx)[0][:, -1, :tok.vocab_size].float()  # (1, V): only ids the tokenizer has, as generation
    p_model = logits.softmax(-1)[0]  # (V,)
    rp = sc.repetition_penalty
    if sc.temperature == 0:
        best = filter_logits(logits, 1.0, 0, 1.0, rp, idx).argmax()
        p_sample, kept_by_k = torch.zeros_like(p_model), torch.ones_like(p_model, dtype=torch.bool)
        p_sample[best] = 1.0
    else:
        p_sample = filter_logits(logits, sc.temperature, sc.top_k, sc.top_p, rp, idx).softmax(-1)[0]
        kept_by_k = filter_logits(logits, sc.temperature, sc.top_k, 1.0, rp, idx)[0] > float("-inf")
    k = min(bars, p_model.numel())
    raised = torch.topk(p_sample, k)  # a repetition penalty can lift tokens into the top few
    shown = torch.cat([torch.topk(p_model, k).indices, raised.indices[raised.values > 0]]).unique()
    shown = shown[p_model[shown].argsort(descending=True)]  # the model's order
    rank = p_model.argsort(descending=True).argsort()  # (V,): 0 = the model's likeliest
    seen = set(ids)
    tokens = [{"id": i, "text": shown_bytes(tok.token_bytes(i)), "p": p_model[i].item(), "p_sample": p_sample[i].item(),
               "rank": rank[i].item(), "seen": i in seen,
               "cut": None if p_sample[i] > 0 else "greedy" if sc.temperature == 0 else "top-k" if not kept_by_k[i] else "top-p"}
              for i in shown.tolist()]
    return {"prompt_tokens": [shown_bytes(tok.token_bytes(i)) for i in ids], "tokens": tokens,
            "other": {"p": max(0.0, 1 - sum(t["p"] for t in tokens)), "p_sample": max(0.0, 1 - sum(t["p_sample"] for t in tokens))},
            "kept": int((p_sample > 0).sum()), "vocab_size": p_model.numel(),
            "sampling": {"temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p, "repetition_penalty": rp}}


# ----------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embedding_map(model, tok, counts, n=200):
    """The n commonest tokens (by `counts`, (V,)) as points: their embeddings (rows of wte,
    C numbers each) centred and projected on the two directions of largest variance (PCA by
    SVD). -> {points: [{id, text, count, x, y}], explained: share of the variance each axis holds}."""
    counts = np.asarray(counts)
    ids = [int(i) for i in np.argsort(-counts, kind="stable")[:n] if counts[i] > 0]
    if len(ids) < 3:
        raise ValueError("the book has fewer than 3 distinct tokens: pick a longer book")
    E = model.transformer.wte.weight[ids].float()  # (n, C)
    X = E - E.mean(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # X = U S Vh: the rows of Vh are the principal axes
    xy = X @ Vh[:2].T  # (n, C) -> (n, 2)
    # an axis has no direction of its own: point each so the commonest token sits on its positive
    # side, so that two versions of a model are drawn the same way round
    xy = xy * torch.where(xy[0] < 0, -1.0, 1.0)
    var = S.pow(2)
    return {"points": [{"id": i, "text": shown_bytes(tok.token_bytes(i)), "count": int(counts[i]), "x": x, "y": y}
                       for i, (x, y) in zip(ids, xy.tolist())],
            "explained": (var[:2] / var.sum()).tolist(), "d_model": model.config.d_model}


def default_book(store, name):
    """The first of a model's training books that is still in the store (None if none is)."""
    stored = {b["name"] for b in store.books.list()}
    return next((b["name"] for b in store.lineage(name)["books"] if b["name"] in stored), None)


# ----------------------------------------------------------------------------- NF4


@torch.no_grad()
def nf4_view(model, layer=None, bins=80):
    """One linear layer in NF4 (default: the first): the histogram of its weights after each
    block of 64 is divided by its absmax (the values the 16 levels encode), how often each
    level is used, the reconstruction error, bits per weight, bytes before and after; and
    quant.nf4_report for the whole model quantized."""
    layers = quant.quantizable(model)
    layer = layer or layers[0]
    if layer not in layers:
        raise NotFound(f"no layer {layer[:80]!r} to quantize; the layers: {', '.join(layers)}")
    w = model.get_submodule(layer).weight.detach()
    n = w.numel()
    normed, _ = quant.absmax_blocks(w)
    q = quant.quantize_nf4(w)
    codes = quant.unpack_4bit(q["codes"])[:n].long()  # (n,) level of each weight
    nf4_model = quant.quantize_model(copy.deepcopy(model))
    return {"layers": layers, "layer": layer, "shape": list(w.shape), "params": n, "block": quant.NF4_BLOCK,
            "levels": quant.NF4.tolist(), "level_share": (torch.bincount(codes, minlength=16) / n).tolist(),
            "histogram": torch.histc(normed.reshape(-1)[:n], bins, -1, 1).tolist(),
            **quant.quantization_error(w, q), "bits_per_weight": 8 * quant.tensor_bytes(q.values()) / n,
            "bytes_before": quant.tensor_bytes([w]), "bytes_after": quant.tensor_bytes(q.values()),
            "whole_model": quant.nf4_report(model, nf4_model)}


# ----------------------------------------------------------------------------- runs


def run_curves(store, names, points=CURVE_POINTS):
    """Every training run of the models `names`, in the order they ran: its train-loss and val
    bits/byte curves (x = step of the run, from metrics.jsonl, whose rows name their run) and
    its record in the lineage (date, status, books, best, settings)."""
    out = []
    for name in names:
        recorded = {r["run_id"]: r for r in store.lineage(name)["runs"]}
        rows = defaultdict(list)
        for row in store.metrics(name):
            rows[row.get("run")].append(row)
        for run_id, rs in rows.items():
            r = recorded.get(run_id, {})
            out.append({"model": name, "run": run_id, "status": r.get("status", "unfinished"), "date": r.get("date"),
                        "books": [b["name"] for b in r.get("books", [])], "best": r.get("best"), "config": r.get("config"),
                        "steps": rs[-1].get("step"),
                        "loss": window_means([(x["step"], x["loss"]) for x in rs if "loss" in x], points),
                        "val_bpb": [[x["step"], x["val_bpb"]] for x in rs if "val_bpb" in x]})
    return {"runs": out}


def window_means(xy, points):
    """At most about `points` points: means of consecutive windows, each at its last x."""
    k = max(1, -(-len(xy) // points))
    return [[xy[min(i + k, len(xy)) - 1][0], sum(y for _, y in xy[i:i + k]) / len(xy[i:i + k])]
            for i in range(0, len(xy), k)]


# how much a text repeats itself: the arena's score, and the self-play benchmark's ------------------
def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens, n):
    """Unique n-grams / all n-grams (Li et al. 2016); 1 = no n-gram occurs twice."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def seq_rep_n(tokens, n=4):
    """Share of n-grams that repeat an earlier one (Welleck et al. 2020): 1 - distinct-n."""
    return 1.0 - distinct_n(tokens, n)
