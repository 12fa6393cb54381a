"""Scoring a model: its validation loss in bits per byte.

Cross-entropy per token depends on the tokenizer: a vocabulary of long tokens has fewer, harder
predictions per sentence than one of short tokens, so two models with different vocabularies do
not compare by it. Bits per byte does: the total cross-entropy in bits over the bytes of text the
predicted tokens spell, the cost of compressing the text with the model (an arithmetic coder
driven by its predictions would need that many bits). `unigram_bpb` is the floor a model must
beat: knowing how common each token is, with no context at all.
"""

import math

import numpy as np
import torch

from hardware import autocast


@torch.no_grad()
def evaluate_bpb(model, data, byte_len, T, n_windows, device, precision="fp32", batch_size=16, should_stop=None):
    """Cross-entropy over up to n_windows evenly spaced, non-overlapping windows of `data`.
    bits/byte = (sum of losses in nats) / ln 2 / (bytes of text those target tokens spell).
    Leaves the model in the mode (train or eval) it found it in. None if `should_stop()` turns
    True between two batches (a Stop during a long evaluation)."""
    was_training = model.training
    model.eval()
    n_windows = max(1, min(n_windows, (len(data) - 1) // T))
    starts = np.linspace(0, len(data) - T - 1, n_windows).astype(np.int64)
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for i in range(0, n_windows, batch_size):
        if should_stop and should_stop():
            model.train(was_training)
            return None
        s = starts[i:i + batch_size]
        rows = torch.from_numpy(data[s[:, None] + np.arange(T + 1)].astype(np.int64)).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        with autocast(device, precision):
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        nats += loss.item()
        n_tokens += y.numel()
        n_bytes += byte_len[y.cpu()].sum().item()
    model.train(was_training)
    return {"val_loss": round(nats / n_tokens, 5), "val_ppl": round(math.exp(nats / n_tokens), 3),
            "val_bpb": round(nats / math.log(2) / max(n_bytes, 1), 5)}


def unigram_bpb(data, byte_len):
    """The baseline a model must beat: bits/byte of val under token frequencies counted on
    train (add-one smoothed) — what you get knowing which tokens are common, but no context."""
    V = len(byte_len)
    counts = np.bincount(np.asarray(data["train"]), minlength=V)[:V] + 1.0
    logp = np.log2(counts / counts.sum())
    val = np.asarray(data["val"])
    return float(-logp[val].sum() / byte_len.numpy()[val].sum())
