"""Self-play: the model proposes tasks from its book, solves them G times, and learns from rewards.

Absolute Zero (Zhao et al. 2025, "Absolute Zero: Reinforced Self-play Reasoning with Zero Data")
trains one model in two roles: a *proposer* that invents tasks and a *solver* that answers them.
The proposer is rewarded for tasks that are *learnable*: ones the solver gets right sometimes but
not always, r = 1 - mean success when 0 < mean success < 1, else 0 (always-solved and
never-solved tasks teach nothing). Here the tasks come from the book itself, so every reward
can be checked against real text:

    continue   a context from the train split; the reference answer is the book's true next
               K = 16 tokens (K <= max_seq_len / 4). Rewards: matched prefix / K, and token F1
               (bag-of-tokens overlap, as in SQuAD).
    free-run   a short book prompt; the model writes the rest of a window. There is no answer,
               only the failure modes of small LMs to avoid: repetition loops (seq-rep-4,
               Welleck et al. 2019) and collapsed vocabulary (distinct-2, Li et al. 2016).

Both degeneration terms are measured *relative to the book's own rate*: a sample scores 1 when it
repeats 4-grams no more often, and uses as many distinct bigrams, as real windows of the same
length do. Rewarding raw diversity would pay the model for gibberish. There is no length term:
rollouts have a fixed length, so it would be a constant.

The proposer keeps a small replay buffer of contexts with their learnability score and draws
from it in proportion to the score; with probability `explore` (and always while the buffer is
empty) it draws a fresh uniform context instead. "Success" is getting the first
`success_tokens` tokens exactly right; a context leaves the buffer once it stops being learnable
or has been used `max_uses` times (so the solver cannot memorise a few contexts).

The solver samples G continuations per task in one batch through the KV cache (the prompt is
run once and its keys/values copied to the G rows). The update is GRPO (Shao et al. 2024,
DeepSeekMath, §4.1): a sample's advantage is its reward minus its group's mean, divided by the
group's std, so no value network is needed. With one gradient step per batch the PPO ratio is 1
and the loss is the plain policy gradient -A * log pi(token), averaged over all sampled tokens.
Two terms keep the model close to its book:

    KL to a frozen reference copy, per token the "k3" estimator r - log r - 1 with
    r = pi_ref / pi (Schulman 2020, "Approximating KL Divergence"): unbiased, always >= 0,
    the form GRPO uses. The reference is reset to the current weights every `ref_reset_every`
    self-play steps (as in ProRL, Liu et al. 2025): training from scratch, a reference frozen at
    the random init would pull the model back towards noise.
    The supervised loss on a fresh book batch, added with weight `sup_coef`.

Choices that came from measurements (`python selfplay.py ab`, numbers in BENCHMARKS.md):
- At temperature 1 a small model's free-run text repeats no more than the book does, so the
  repetition reward is flat and teaches nothing; at 0.5 it loops (seq-rep-4 0.2-0.6 in the
  first steps vs the book's 0.02). Free-run samples at `freerun_temperature` = 0.5, and the gradient is taken for that
  tempered policy, softmax(logits / 0.5), so it is an exact policy gradient for what was sampled.
- A self-play step costs as much compute as 3-4 supervised steps (from the step counts at equal
  CPU time). Continue steps use 2 contexts of 64 tokens, not 4 of 128, to be cheaper; that
  setting gave the best trade of those tried.
- What it buys, at equal compute on the small preset (3 seeds): sampled text (t=0.8) with more
  distinct bigrams (closer to the book's) and fewer repeated 4-grams (further below the book's),
  and slightly better token F1 against the real continuation (+0.02). What it costs: fewer
  supervised steps, so worse validation bits/byte (+0.08), and greedy decoding's loops got no
  better (its distinct-2 slightly worse). Self-play shapes *sampled generations*; at this scale
  it does not buy likelihood, which supervised steps buy more cheaply.

The A/B benchmark behind these numbers is `python bench.py selfplay` (benchmarks live in bench.py).
"""

import copy
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generate import rollouts
from hardware import autocast


@dataclass
class SelfPlayConfig:
    group_size: int = 8  # G: samples per task, the group GRPO compares within
    tasks_per_step: int = 2  # continue tasks per self-play step
    context_tokens: int = 64  # continue: context length (capped at max_seq_len - answer_tokens)
    answer_tokens: int = 16  # K: continue: reference tokens (capped at max_seq_len // 4)
    freerun_every: int = 2  # every n-th self-play step is a free-run step (0 = never)
    freerun_tasks: int = 2  # prompts per free-run step
    freerun_prompt_tokens: int = 32  # capped at max_seq_len // 4; the rest of the window is written
    temperature: float = 1.0  # continue: sampling temperature; the gradient is for this policy
    freerun_temperature: float = 0.5  # free-run: cooler, where small models fall into loops
    w_prefix: float = 1.0  # reward weights (the reward is the weighted mean of its components)
    w_f1: float = 1.0
    w_rep: float = 0.5
    w_distinct: float = 0.5
    scale_by_std: bool = True  # GRPO divides by the group std; Dr. GRPO (Liu et al. 2025) does not
    kl_coef: float = 0.04  # beta
    sup_coef: float = 1.0  # weight of the supervised loss mixed into every self-play step
    ref_reset_every: int = 10  # self-play steps between reference resets (0 = frozen for the run)
    buffer_size: int = 32  # proposer's replay buffer of learnable contexts
    explore: float = 0.5  # chance of a fresh uniform context instead of one from the buffer
    success_tokens: int = 2  # a sample "solves" a context when its first n tokens are right
    max_uses: int = 4  # a context leaves the buffer after this many uses
    seed_offset: int = 7919  # self-play's RNGs are seeded with TrainConfig.seed + this


# ----------------------------------------------------------------------------- the stage


class SelfPlay:
    """One self-play step at a time. It sees the trainer through a narrow interface: the model,
    `get_batch()` -> a supervised (x, y) batch, `optimizer_step(loss)` -> backward and one
    optimizer step, and the train split's token array."""

    def __init__(self, model, get_batch, optimizer_step, train_tokens, precision, seed, cfg=None):
        self.model, self.get_batch, self.optimizer_step = model, get_batch, optimizer_step
        self.train_tokens, self.precision, self.cfg = train_tokens, precision, cfg or SelfPlayConfig()
        self.device = next(model.parameters()).device
        self.ref = frozen_copy(model)
        seed = seed + self.cfg.seed_offset
        self.task_gen = torch.Generator().manual_seed(seed)  # proposer's choices, on the CPU
        self.sample_gen = torch.Generator(device=self.device).manual_seed(seed)  # the solver's tokens
        self.proposer = Proposer(self.cfg.buffer_size, self.cfg.explore, self.cfg.max_uses)
        self.n_steps = 0
        self._set_lengths()

    def _set_lengths(self):
        T, c = self.model.config.max_seq_len, self.cfg
        self.K = min(c.answer_tokens, T // 4)
        self.P = min(c.context_tokens, T - self.K)
        self.free_P = min(c.freerun_prompt_tokens, T // 4)
        self.free_new = T - self.free_P
        # the book's own rates on windows as long as a rollout: the targets for the rewards
        self.book = {n: book_rates(self.train_tokens, n) for n in {self.K, self.free_new}}

    def step(self):
        """Propose, solve, reward, update. Returns a flat dict of floats for metrics.jsonl."""
        c = self.cfg
        if c.ref_reset_every and self.n_steps and self.n_steps % c.ref_reset_every == 0:
            self.ref.load_state_dict(self.model.state_dict())
        free = c.freerun_every and self.n_steps % c.freerun_every == c.freerun_every - 1
        prompts, refs, starts = self._freerun_tasks() if free else self._continue_tasks()
        n_new = self.free_new if free else self.K
        temperature = c.freerun_temperature if free else c.temperature
        samples = sample_groups(self.model, prompts, c.group_size, n_new, temperature,
                                self.sample_gen, self.precision)  # (N*G, n_new)
        rewards, parts = self._rewards(samples, refs, self.book[n_new])
        metrics = self._update(prompts, samples, rewards, temperature)
        metrics.update(parts, freerun=float(free), reward=rewards.mean().item(),
                       reward_std=rewards.std().item())
        if not free:
            metrics.update(self._score_tasks(samples, refs, starts))
        self.n_steps += 1
        return {k: round(float(v), 5) for k, v in metrics.items()}

    # tasks ---------------------------------------------------------------------
    def _continue_tasks(self):
        """N book windows: contexts (N, P), reference answers (N, K), their start offsets."""
        data, span = self.train_tokens, self.P + self.K
        starts = self.proposer.propose(self.cfg.tasks_per_step, len(data) - span, self.task_gen)
        rows = windows(data, starts, span).to(self.device)
        return rows[:, :self.P], rows[:, self.P:], starts

    def _freerun_tasks(self):
        data = self.train_tokens
        starts = torch.randint(len(data) - self.free_P, (self.cfg.freerun_tasks,), generator=self.task_gen).tolist()
        return windows(data, starts, self.free_P).to(self.device), None, starts

    # rewards -------------------------------------------------------------------
    def _rewards(self, samples, refs, book):
        """(N*G,) total rewards and the mean of every component, for the log."""
        c, G = self.cfg, self.cfg.group_size
        rows, parts = [], {}
        for i, s in enumerate(samples.tolist()):
            r = {"rep_score": repetition_score(s, book["seq_rep_4"]),
                 "distinct_score": distinct_score(s, book["distinct_2"])}
            weights = {"rep_score": c.w_rep, "distinct_score": c.w_distinct}
            if refs is not None:
                ref = refs[i // G].tolist()
                r.update(prefix_match=prefix_match(s, ref), token_f1=token_f1(s, ref))
                weights.update(prefix_match=c.w_prefix, token_f1=c.w_f1)
            rows.append(sum(weights[k] * r[k] for k in r) / max(sum(weights.values()), 1e-8))
            for k, v in r.items():
                parts[k] = parts.get(k, 0.0) + v / len(samples)
        parts["seq_rep_4"] = float(np.mean([seq_rep_n(s, 4) for s in samples.tolist()]))
        parts["distinct_2"] = float(np.mean([distinct_n(s, 2) for s in samples.tolist()]))
        return torch.tensor(rows, device=samples.device), parts

    def _score_tasks(self, samples, refs, starts):
        """AZR's proposer reward: update each context's learnability from its G samples."""
        G, need = self.cfg.group_size, min(self.cfg.success_tokens, self.K)
        solved = (samples[:, :need] == refs.repeat_interleave(G, 0)[:, :need]).all(1).float()  # (N*G,)
        rates = solved.view(-1, G).mean(1).tolist()  # (N,)
        self.proposer.update(starts, rates)
        scores = [learnability(p) for p in rates]
        return {"solve_rate": float(np.mean(rates)), "learnability": float(np.mean(scores)),
                "buffer_size": float(len(self.proposer.buffer))}

    # the update ----------------------------------------------------------------
    def _update(self, prompts, samples, rewards, temperature):
        """One optimizer step on pg_loss + kl_coef * KL + sup_coef * supervised loss."""
        c, model = self.cfg, self.model
        model.train()
        seqs = torch.cat([prompts.repeat_interleave(c.group_size, 0), samples], 1)  # (N*G, P+n)
        P = prompts.size(1)
        with autocast(self.device, self.precision):
            logits = model(seqs[:, :-1])[0][:, P - 1:].float()  # (N*G, n, V): the sampled positions
            with torch.no_grad():
                ref_logits = self.ref(seqs[:, :-1])[0][:, P - 1:].float()
            x, y = self.get_batch()
            _, sup_loss = model(x, y)
        logp = token_logprobs(logits / temperature, samples)  # (N*G, n): the policy we sampled
        adv = group_advantages(rewards, c.group_size, c.scale_by_std)  # (N*G,)
        pg_loss = -(adv[:, None] * logp).sum() / samples.numel()  # normalised by token count
        kl = k3_kl(token_logprobs(logits, samples), token_logprobs(ref_logits, samples)).mean()
        loss = pg_loss + c.kl_coef * kl + c.sup_coef * sup_loss
        norm = self.optimizer_step(loss)
        return {"loss": loss.item(), "pg_loss": pg_loss.item(), "kl": kl.item(), "sup_loss": sup_loss.item(),
                "entropy": -logp.mean().item(), "grad_norm": norm}

    # checkpoints ---------------------------------------------------------------
    def state(self):
        """Everything a resumed run needs to continue bit for bit: (tensors, JSON meta)."""
        tensors = {f"ref.{k}": v for k, v in self.ref.state_dict().items() if k != "lm_head.weight"}
        tensors["rng.task"] = self.task_gen.get_state()
        tensors["rng.sample"] = self.sample_gen.get_state()
        tensors.update(self.proposer.state())
        return tensors, {"config": asdict(self.cfg), "steps": self.n_steps}

    def load_state(self, tensors, meta):
        self.cfg = SelfPlayConfig(**meta["config"])
        self._set_lengths()
        self.ref.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ref.")}, strict=False)
        self.task_gen.set_state(tensors["rng.task"])
        self.sample_gen.set_state(tensors["rng.sample"])
        self.proposer = Proposer(self.cfg.buffer_size, self.cfg.explore, self.cfg.max_uses)
        self.proposer.load_state(tensors)
        self.n_steps = meta["steps"]


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def windows(data, starts, length):
    """Token windows data[s:s+length] for each start -> (N, length) int64."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)
    return torch.from_numpy(data[idx].astype(np.int64))


def book_rates(data, n_tokens, n_windows=256):
    """seq-rep-4 and distinct-2 of the book itself, averaged over evenly spaced windows."""
    starts = np.linspace(0, len(data) - n_tokens - 1, n_windows).astype(np.int64)
    rows = windows(data, starts, n_tokens).tolist()
    return {"seq_rep_4": float(np.mean([seq_rep_n(r, 4) for r in rows])),
            "distinct_2": float(np.mean([distinct_n(r, 2) for r in rows]))}


# ----------------------------------------------------------------------------- the proposer


class Proposer:
    """Replay buffer of learnable contexts {start offset: [learnability, uses]} (AZR §3.1)."""

    def __init__(self, size, explore, max_uses):
        self.size, self.explore, self.max_uses = size, explore, max_uses
        self.buffer = {}

    def propose(self, n, high, gen):
        """n start offsets in [0, high): fresh uniform ones or buffer picks weighted by score."""
        starts = []
        for _ in range(n):
            if not self.buffer or torch.rand(1, generator=gen).item() < self.explore:
                starts.append(torch.randint(high, (1,), generator=gen).item())
            else:
                keys = list(self.buffer)
                scores = torch.tensor([self.buffer[k][0] for k in keys], dtype=torch.float64)
                starts.append(keys[torch.multinomial(scores, 1, generator=gen).item()])
        return starts

    def update(self, starts, success_rates):
        for s, p in zip(starts, success_rates):
            score, uses = learnability(p), self.buffer.pop(s, [0.0, 0])[1] + 1
            if score > 0 and uses < self.max_uses:
                self.buffer[s] = [score, uses]
        while len(self.buffer) > self.size:  # evict the least learnable
            del self.buffer[min(self.buffer, key=lambda k: self.buffer[k][0])]

    def state(self):
        keys = list(self.buffer)
        return {"buffer.start": torch.tensor(keys, dtype=torch.int64),
                "buffer.score": torch.tensor([self.buffer[k][0] for k in keys], dtype=torch.float64),
                "buffer.uses": torch.tensor([self.buffer[k][1] for k in keys], dtype=torch.int64)}

    def load_state(self, tensors):
        rows = zip(tensors["buffer.start"].tolist(), tensors["buffer.score"].tolist(), tensors["buffer.uses"].tolist())
        self.buffer = {s: [score, uses] for s, score, uses in rows}


def learnability(success_rate):
    """AZR's proposer reward: 1 - p for tasks solved sometimes (0 < p < 1), else 0."""
    return 1.0 - success_rate if 0.0 < success_rate < 1.0 else 0.0


# ----------------------------------------------------------------------------- the solver


def sample_groups(model, prompts, G, n_new, temperature, gen, precision="fp32"):
    """G continuations of n_new tokens for each prompt (N, P) -> (N*G, n_new), in one batch
    through the KV cache (generate.rollouts)."""
    with autocast(prompts.device, precision):
        out = rollouts(model, prompts.repeat_interleave(G, 0), n_new, temperature, gen)
    model.train()
    return out


def token_logprobs(logits, tokens):
    """log p(token) under logits (B, n, V) for tokens (B, n) -> (B, n)."""
    return F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def group_advantages(rewards, G, scale_by_std=True, eps=1e-6):
    """GRPO: (N*G,) rewards -> advantages relative to each group of G (mean 0, std 1 if scaled).
    A group whose samples all score the same gets 0: it says nothing about which is better."""
    r = rewards.view(-1, G)  # (N, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, keepdim=True, correction=0) + eps)
    return adv.view(-1)


def k3_kl(logp, ref_logp):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: r - log r - 1 with
    r = pi_ref / pi. Its mean is the true KL; each term is >= 0 and exactly 0 when pi == pi_ref."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


# ----------------------------------------------------------------------------- rewards


def prefix_match(sample, ref):
    """Share of the reference the sample gets right before its first mistake, in [0, 1]."""
    n = 0
    for a, b in zip(sample, ref):
        if a != b:
            break
        n += 1
    return n / len(ref)


def token_f1(sample, ref):
    """F1 of the two bags of tokens (order ignored): partial credit for the right words."""
    overlap = sum((Counter(sample) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(sample), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens, n):
    """Unique n-grams / all n-grams (Li et al. 2016); 1 = no n-gram occurs twice."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def seq_rep_n(tokens, n=4):
    """Share of n-grams that repeat an earlier one (Welleck et al. 2019): 1 - distinct-n."""
    return 1.0 - distinct_n(tokens, n)


def repetition_score(tokens, book_rep):
    """1 while the sample repeats 4-grams no more than the book does, falling towards 0 in a loop."""
    excess = max(0.0, seq_rep_n(tokens, 4) - book_rep)
    return 1.0 - excess / max(1.0 - book_rep, 1e-8)


def distinct_score(tokens, book_distinct):
    """distinct-2 relative to the book's, capped at 1: no bonus for more variety than real text."""
    return min(1.0, distinct_n(tokens, 2) / max(book_distinct, 1e-8))
