"""Generation tokens/s at batch 1: with the KV cache, without it (the whole prefix re-run for
each token), and the peer's `generate()` with the same sampling settings."""

import statistics
from dataclasses import replace

import torch

from generate import SamplingConfig, generate_ids, sample_next
from hardware import autocast
from model import GPT
from bench.common import interleave


def generate_row(preset, cfg, device, precision, peer, sizes):
    """Batch-1 sampling speed of 200 new tokens after a 16-token prompt. A preset whose context
    is shorter than that gets a longer position table here (both models): only wpe grows."""
    n = sizes["new_tokens"]
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, 16 + n))
    torch.manual_seed(0)
    ours = GPT(cfg).to(device).eval()
    prompt = torch.randint(cfg.vocab_size, (1, 16), device=device)
    sc = SamplingConfig(max_new_tokens=n, seed=0)  # SamplingConfig's defaults: T 0.8, top-k 50, top-p 0.95
    runs = {"cache": lambda: sum(1 for _ in generate_ids(ours, prompt, sc)),
            "no_cache": lambda: generate_without_cache(ours, prompt, sc)}
    if peer:
        model = peer["model"](cfg).to(device).eval()
        runs["peer"] = lambda: peer["generate"](model, prompt, sc)
    with autocast(device, precision):
        for f in runs.values():
            f()  # warm-up
        times = interleave(runs, sizes["gen_rounds"])
    rate = {k: [n / t for t in ts] for k, ts in times.items()}
    row = {"preset": preset, "precision": precision, "new_tokens": n,
           "ours_cache_tok_s": statistics.median(rate["cache"]), "ours_no_cache_tok_s": statistics.median(rate["no_cache"]),
           "peer_tok_s": None, "ratio": None}
    if peer:
        row.update(peer_tok_s=statistics.median(rate["peer"]),
                   ratio=statistics.median(a / b for a, b in zip(rate["cache"], rate["peer"])))
    return row


@torch.no_grad()
def generate_without_cache(model, idx, sc):
    """nanoGPT's generate: the whole sequence goes through the model again for every new token."""
    gen = torch.Generator(device=idx.device).manual_seed(sc.seed)
    for _ in range(sc.max_new_tokens):
        logits, _ = model(idx)
        nxt = sample_next(logits[:, -1, :], sc, idx, gen)  # (1, 1)
        logits[0, -1].float().softmax(-1)  # the token view's probabilities, as generate_ids yields
        idx = torch.cat([idx, nxt], dim=1)
    return idx
