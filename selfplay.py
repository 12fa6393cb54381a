"""Self-play against repetition: the model reads its own greedy continuations and unlearns its loops.

Greedy decoding of a small LM trained on one book loops ("не не не не ..."): once a phrase has
appeared, copying it again is the most likely next step, and every copy makes the next one more
likely. Teacher forcing never shows the model such a context, so the supervised loss cannot see
the problem. Self-play can: let the model write, find where it starts to repeat itself, and teach
it another choice in exactly those places.

When: once supervised learning has stopped paying. Welleck et al. 2020 ("Neural Text Generation
with Unlikelihood Training", §6) applied sequence-level unlikelihood as a short fine-tune of an
already converged model, and its perplexity did not get worse; mixed in from early on, a self-play
step costs a supervised step that the model still needed. So the trainer (azr_trainer.py) starts
it at the plateau, where early stopping would end the run: back to the kept weights, then self-play
steps only, for what is left of the budget. Every run gets it in its tail (from `selfplay_start`
on, one self-play step after every `selfplay_every` supervised steps), where the learning rate is
low and a supervised step buys little; a plateau at the peak learning rate, which starts the decay
early (schedule.py), brings that tail in with it. Keep-best then chooses, among the weights
whose val bits/byte is within early stopping's tolerance of the best, the ones whose greedy text
repeats least on fixed val prompts (`greedy_repeats`).

One self-play step:

    propose   R contexts of P tokens from the train split (the proposer, below)
    roll out  the model continues each one for n tokens, greedily (where loops happen), all R rows
              together through one KV cache, one rollout per context. Decoding blocks every token
              that would complete a 4-gram already in the rollout more often than the book itself
              repeats that 4-gram within n tokens — a refrain the book really repeats is allowed —
              and takes the model's best allowed token instead (n-gram blocking, Paulus et al.
              2018). So the rollout never loops, and each block is a decision point: the context,
              the repeat r greedy wanted, the replacement a it took.
    update    at every decision point, softplus(z_r - z_a) = -log(1 - p~(r)), p~ the softmax over
              the pair {r, a}: unlikelihood (Welleck et al. 2020) inside the pair. The plain form,
              -log(1 - p(r)) over the whole vocabulary (an ablation in bench/selfplay_ab.py),
              gives r's mass to *every* token:
              on small models that raised never-trained byte tokens and dropped newlines. The pair
              form moves mass only to a token the model itself ranked next — what greedy decoding
              needs: the argmax to change where the loop would start.

A self-play step is an optimizer step of its own: mixing the loss of a book batch into it was
measured worse at equal time (the clipped gradient of the sum is mostly the self-play term).

The proposer (Absolute Zero, Zhao et al. 2025, §3: reward the proposer for tasks that are
*learnable*, solved neither never nor always). Here a task is a context, and failing it is a
rollout in which greedy wanted to repeat itself. A context that failed goes into a small replay
buffer and is drawn again with weight p(1 - p), p its smoothed failure rate (fails + 1) /
(visits + 2): the Bernoulli variance, 0 for never and always, largest for "sometimes". With
probability `explore`, and while the buffer is empty, a fresh context is drawn uniformly.

Cost: the rollouts are decoded token by token, all R rows as one batch through a KV cache; a
wider batch of shorter rollouts fills each decoding step with more rows for about the same time
per step (BENCHMARKS.md has the profile). The reward the page draws is 1 - the share of rollout
tokens where greedy wanted to repeat, beside the proposer's learnability.

The A/B behind these choices is `python -m bench selfplay` (numbers in BENCHMARKS.md). Tried there
and left out: GRPO over several samples per context with rewards against the book's real next
tokens and a KL penalty to a reference copy (the stage this one replaced), DITTO-style
pseudo-repetition.
"""

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generate import rollouts
from hardware import autocast


@dataclass
class SelfPlayConfig:
    rollouts: int = 16  # R: contexts per step, one rollout each
    prompt_tokens: int = 32  # P (capped at max_seq_len // 2)
    new_tokens: int = 48  # n (capped at max_seq_len - P)
    ngram: int = 4  # a token that completes a repeated 4-gram is a repeat
    alpha: float = 1.0  # weight of the self-play loss
    explore: float = 0.5  # chance of a fresh uniform context instead of a buffer pick
    buffer_size: int = 64
    max_visits: int = 4  # a context leaves the buffer after this many rollouts
    seed_offset: int = 7919  # the proposer's RNG is seeded with the run's seed + this


class SelfPlay:
    """One self-play step at a time. It sees the trainer through a narrow interface: the model,
    `optimizer_step(loss)` -> backward and one optimizer step, and the train split's tokens."""

    def __init__(self, model, optimizer_step, train_tokens, precision, seed, cfg=None):
        self.model, self.optimizer_step, self.data, self.precision = model, optimizer_step, train_tokens, precision
        self.cfg = c = cfg or SelfPlayConfig()
        self.device = next(model.parameters()).device
        T = model.config.max_seq_len
        self.P = min(c.prompt_tokens, T // 2)
        self.n = min(c.new_tokens, T - self.P)
        self.allow = book_allowance(train_tokens, c.ngram, self.n)  # derived from the book: the same on resume
        self.gen = torch.Generator().manual_seed(seed + c.seed_offset)  # the proposer's draws
        self.proposer = Proposer(c.buffer_size, c.explore, c.max_visits)
        self.n_steps = 0

    def step(self):
        """Propose, roll out, update. Returns a flat dict for metrics.jsonl."""
        starts, picked = self.proposer.propose(self.cfg.rollouts, len(self.data) - self.P, self.gen)
        prompts = windows(self.data, starts, self.P).to(self.device)  # (R, P)
        outs, wanted = self.roll_out(prompts)  # (R, n) each
        marks = wanted >= 0  # (R, n): the decision points
        failed = marks.any(1).tolist()
        self.proposer.update(starts, failed)
        m = self._update(prompts, outs, marks, wanted)
        self.n_steps += 1
        repeat_rate = marks.float().mean().item()
        m.update(repeat_rate=repeat_rate, reward=1.0 - repeat_rate, looping=float(np.mean(failed)),
                 **self.proposer.stats(picked, failed))
        out = {k: round(float(v), 5) for k, v in m.items()}
        out["example"] = example(prompts, outs, wanted)
        return out

    def roll_out(self, prompts):
        """Blocked greedy rollouts -> (tokens, wanted) (R, n) each: wanted is the repeat greedy
        wanted where a block made it take another token, -1 elsewhere."""
        with autocast(self.device, self.precision):
            return rollouts(self.model, prompts, self.n, ban=self.banned)

    def banned(self, rows):
        return [banned_next(r, self.cfg.ngram, self.allow) for r in rows]

    def loss(self, logits, wanted, outs, marks):
        """The mean pair loss over the decision points."""
        return pair_loss(logits, wanted, outs, marks) / marks.sum()

    @torch.no_grad()
    def greedy_repeats(self, val_tokens, prompts=16):
        """Share of plain greedy tokens, after `prompts` fixed, evenly spaced val prompts, that repeat
        a 4-gram of their own continuation more often than the book does: the loop measure
        keep-best weighs against val bits/byte (the same prompts every time, no RNG)."""
        starts = np.linspace(0, len(val_tokens) - self.P - 1, prompts).astype(np.int64)
        was_training = self.model.training
        with autocast(self.device, self.precision):
            outs = rollouts(self.model.eval(), windows(val_tokens, starts, self.P).to(self.device), self.n)
        self.model.train(was_training)
        marks = [mark_repeats(r, self.cfg.ngram, self.allow) for r in outs.tolist()]
        return round(float(np.mean(marks)), 5)

    def _update(self, prompts, outs, marks, wanted):
        """One optimizer step on alpha * the self-play loss of the marked positions."""
        self.model.train()
        keep = marks.any(1)  # rows without a mark give no gradient: skip their forward...
        if not keep.any():
            return {"sp_loss": 0.0, "grad_norm": self.optimizer_step(None)}  # None: nothing to learn (DDP: join the average)
        L = int(marks.nonzero()[:, 1].max()) + 1  # ... and the tokens after the last mark
        seq = torch.cat([prompts[keep], outs[keep, :L]], 1)  # (r, P+L)
        with autocast(self.device, self.precision):
            logits = self.model(seq[:, :-1])[0][:, self.P - 1:]  # (r, P+L-1, V) -> (r, L, V)
        loss = self.loss(logits, wanted[keep, :L], outs[keep, :L], marks[keep, :L])
        return {"sp_loss": loss.item(), "grad_norm": self.optimizer_step(self.cfg.alpha * loss)}

    # checkpoints ---------------------------------------------------------------
    def state(self):
        """Everything a resumed run needs to continue bit for bit: (tensors, JSON meta)."""
        return {"rng": self.gen.get_state(), **self.proposer.state()}, {"config": asdict(self.cfg), "steps": self.n_steps}

    def load_state(self, tensors, meta):
        if SelfPlayConfig(**meta["config"]) != self.cfg:
            raise ValueError("this checkpoint was written with another self-play config; resume with that one")
        self.gen.set_state(tensors["rng"])
        self.proposer.load_state(tensors)
        self.n_steps = meta["steps"]


def windows(data, starts, length):
    """Token windows data[s:s+length] for each start -> (N, length) int64."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)
    return torch.from_numpy(data[idx].astype(np.int64))


def example(prompts, outs, wanted):
    """One rollout for the page's teaching view: its prompt, the tokens it wrote and, where a
    repeat was blocked, the token greedy wanted (-1 elsewhere): the rollout with the most blocks."""
    r = int((wanted >= 0).sum(1).argmax())
    return {"prompt": prompts[r].tolist(), "tokens": outs[r].tolist(), "pushed_down": wanted[r].tolist()}


# ----------------------------------------------------------------------------- repeats and losses


def book_allowance(data, n, window):
    """{n-gram: k} for the n-grams the book itself repeats within `window` tokens: k = the most
    repeats of it in any window (occurrences - 1). All in numpy: the book sorted by n-gram."""
    N = len(data) - n + 1
    grams = np.lib.stride_tricks.sliding_window_view(np.asarray(data, dtype=np.int64), n)  # (N, n)
    gid = np.unique(grams, axis=0, return_inverse=True)[1].reshape(-1)  # (N,): an id per distinct n-gram
    key = np.sort(gid * (N + window) + np.arange(N))  # by n-gram, then by position
    # occurrences of the same n-gram that start within the window opened by each occurrence
    count = np.searchsorted(key, key + (window - n + 1)) - np.arange(N)  # (N,)
    most = np.zeros(gid.max() + 1, dtype=np.int64)
    np.maximum.at(most, key // (N + window), count)
    first = np.full(len(most), -1)
    first[gid[::-1]] = np.arange(N)[::-1]  # a position of each n-gram, to spell it out
    return {tuple(grams[first[g]].tolist()): int(most[g] - 1) for g in np.flatnonzero(most > 1)}


def mark_repeats(tokens, n, allow):
    """For each token: True when it completes an n-gram seen earlier in `tokens` more often than
    allow[ngram] times (the book's own repeats of it within a rollout's length; default 0)."""
    seen, marks = Counter(), [False] * len(tokens)
    for i in range(n - 1, len(tokens)):
        g = tuple(tokens[i - n + 1:i + 1])
        marks[i] = seen[g] > allow.get(g, 0)
        seen[g] += 1
    return marks


def banned_next(tokens, n, allow):
    """Tokens x such that tokens[-(n-1):] + [x] would repeat an n-gram of `tokens` beyond allow."""
    if len(tokens) < n - 1:
        return []
    head = tuple(tokens[len(tokens) - n + 1:])
    seen = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == head)
    return [g[-1] for g, k in seen.items() if k > allow.get(g, 0)]


def pair_loss(logits, repeat, replacement, marks):
    """Sum over marked positions of softplus(z_repeat - z_replacement): the logistic loss of
    preferring the replacement, i.e. -log(1 - p(repeat)) with p the softmax over the two.
    logits (B, n, V); repeat, replacement, marks (B, n)."""
    z = logits.float()
    z_rep = z.gather(-1, repeat.clamp(min=0)[..., None]).squeeze(-1)  # (B, n); -1 (no block) -> any id, masked
    z_alt = z.gather(-1, replacement[..., None]).squeeze(-1)
    return (F.softplus(z_rep - z_alt) * marks).sum()


# ----------------------------------------------------------------------------- the proposer


class Proposer:
    """Replay buffer of contexts whose rollouts failed: {start: [visits, fails]} (AZR §3)."""

    def __init__(self, size, explore, max_visits):
        self.size, self.explore, self.max_visits = size, explore, max_visits
        self.buffer = {}

    def propose(self, n, high, gen):
        """n start offsets in [0, high) and, for each, whether it came from the buffer."""
        starts, picked = [], []
        for _ in range(n):
            fresh = not self.buffer or torch.rand(1, generator=gen).item() < self.explore
            if fresh:
                starts.append(torch.randint(high, (1,), generator=gen).item())
            else:
                keys = list(self.buffer)
                w = torch.tensor([learnability(*self.buffer[k]) for k in keys], dtype=torch.float64)
                starts.append(keys[torch.multinomial(w, 1, generator=gen).item()])
            picked.append(not fresh)
        return starts, picked

    def update(self, starts, failed):
        for s, fail in zip(starts, failed):
            visits, fails = self.buffer.pop(s, [0, 0])
            visits, fails = visits + 1, fails + int(fail)
            if fails and visits < self.max_visits:  # never failed: nothing to unlearn there
                self.buffer[s] = [visits, fails]
        while len(self.buffer) > self.size:  # evict the least learnable
            del self.buffer[min(self.buffer, key=lambda k: learnability(*self.buffer[k]))]

    def stats(self, picked, failed):
        """Failure rate of buffer picks and of fresh contexts: the buffer should find failures more often."""
        out = {"buffer_size": len(self.buffer), "from_buffer": np.mean(picked),
               "learnability": np.mean([learnability(*v) for v in self.buffer.values()] or [0.0])}
        for name, want in (("buffer", True), ("fresh", False)):
            mine = [f for p, f in zip(picked, failed) if p == want]
            if mine:
                out[f"fail_rate_{name}"] = np.mean(mine)
        return out

    def state(self):
        keys = list(self.buffer)
        return {"buffer.start": torch.tensor(keys, dtype=torch.int64),
                "buffer.counts": torch.tensor([self.buffer[k] for k in keys], dtype=torch.int64).view(-1, 2)}

    def load_state(self, tensors):
        self.buffer = {s: c for s, c in zip(tensors["buffer.start"].tolist(), tensors["buffer.counts"].tolist())}


def learnability(visits, fails):
    """p (1 - p) of the smoothed failure rate p = (fails + 1) / (visits + 2): near 0 for contexts
    that never or always fail, 1/4 for those that fail half the time."""
    p = (fails + 1) / (visits + 2)
    return p * (1 - p)
