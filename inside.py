"""Looking inside a model: the numbers behind the page's teaching views.

Each function takes a model (and its tokenizer) and returns plain data for one view; the web
layer only serialises it. Nothing here trains or changes a model.
"""

import torch

ATTENTION_MAX_TOKENS = 64  # a 64 x 64 heatmap is still readable; longer prompts keep their end


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
