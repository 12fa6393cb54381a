"""Self-play: each reward on hand-made examples, GRPO advantages, the k3 KL estimator, the
proposer's learnability, the batched KV-cache sampler, one self-play step, and exact resume."""

import math

import pytest
import torch

import runs
from azr_trainer import new_run
from conftest import quick_train_config, tiny_config
from model import GPT
from runs import resume, train
from selfplay import (Proposer, SelfPlay, distinct_n, distinct_score, group_advantages, k3_kl, learnability,
                      prefix_match, repetition_score, sample_groups, seq_rep_n, token_f1)

# ----------------------------------------------------------------------------- rewards


def test_prefix_match_counts_tokens_before_the_first_mistake():
    ref = [1, 2, 3, 4]
    assert prefix_match([1, 2, 3, 4], ref) == 1.0
    assert prefix_match([1, 2, 9, 4], ref) == 0.5  # the right 4th token after a mistake does not count
    assert prefix_match([9, 2, 3, 4], ref) == 0.0


def test_token_f1_ignores_order_and_counts_duplicates_once_each():
    assert token_f1([4, 3, 2, 1], [1, 2, 3, 4]) == 1.0
    assert token_f1([5, 6], [1, 2]) == 0.0
    # sample [1, 1, 5, 6] vs ref [1, 2, 3, 4]: one shared token; precision 1/4, recall 1/4
    assert token_f1([1, 1, 5, 6], [1, 2, 3, 4]) == pytest.approx(0.25)
    # sample [1, 2] vs ref [1, 2, 3, 4]: precision 1, recall 1/2 -> F1 2/3
    assert token_f1([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 3)


def test_distinct_and_seq_rep_on_a_loop_and_on_fresh_text():
    loop = [7, 8] * 6  # "a b a b ...": 11 bigrams, 2 distinct
    assert distinct_n(loop, 2) == pytest.approx(2 / 11)
    assert seq_rep_n(loop, 4) == pytest.approx(1 - 2 / 9)  # 9 four-grams, 2 distinct
    fresh = list(range(12))
    assert distinct_n(fresh, 2) == 1.0
    assert seq_rep_n(fresh, 4) == 0.0


def test_repetition_score_is_relative_to_the_books_own_rate():
    fresh, loop = list(range(20)), [3] * 20
    assert repetition_score(fresh, book_rep=0.1) == 1.0
    assert repetition_score(loop, book_rep=0.1) == pytest.approx(1 - (16 / 17 - 0.1) / 0.9)  # 17 four-grams, 1 distinct
    # a sample as repetitive as the book is not penalised; twice as repetitive is
    sample = [1, 2, 3, 4, 1, 2, 3, 4, 9, 10, 11]  # 8 four-grams, 1 repeat -> seq-rep-4 0.125
    assert repetition_score(sample, book_rep=0.125) == 1.0
    assert repetition_score(sample, book_rep=0.0) == pytest.approx(0.875)


def test_distinct_score_gives_no_bonus_beyond_the_book():
    assert distinct_score(list(range(10)), book_distinct=0.9) == 1.0  # more varied than the book: capped
    assert distinct_score([1, 1, 1, 2, 2, 2], book_distinct=0.8) == pytest.approx(0.6 / 0.8)  # 3/5 distinct


# ----------------------------------------------------------------------------- GRPO pieces


def test_group_advantages_are_centred_and_scaled_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    adv = group_advantages(rewards, G=4).view(2, 4)
    assert adv[0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[0].std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal, and no NaN
    raw = group_advantages(rewards, G=4, scale_by_std=False).view(2, 4)
    assert torch.allclose(raw[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_k3_kl_is_zero_for_identical_policies_and_estimates_the_true_kl():
    logp = torch.log_softmax(torch.randn(5, 7), -1)
    assert torch.equal(k3_kl(logp, logp), torch.zeros(5, 7))
    # sample from p, average k3: close to the exact KL(p || q)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[x], q.log()[x]).mean().item()
    exact = (p * (p / q).log()).sum().item()
    assert estimate == pytest.approx(exact, rel=0.05)
    assert (k3_kl(p.log()[x], q.log()[x]) >= 0).all()


def test_learnability_rewards_tasks_solved_sometimes():
    assert learnability(0.0) == 0.0
    assert learnability(1.0) == 0.0
    assert learnability(0.25) == 0.75


def test_proposer_keeps_learnable_contexts_and_drops_solved_ones():
    prop = Proposer(size=2, explore=0.0, max_uses=10)
    prop.update([10, 20, 30], [0.5, 1.0, 0.0])
    assert list(prop.buffer) == [10]  # always and never solved teach nothing
    prop.update([40, 50], [0.25, 0.875])  # over capacity: the least learnable (50) goes
    assert sorted(prop.buffer) == [10, 40]
    g = torch.Generator().manual_seed(0)
    assert set(prop.propose(20, high=1000, gen=g)) <= {10, 40}  # explore=0: only buffer picks
    prop.update([10] * 9, [0.5] * 9)
    assert 10 not in prop.buffer  # used max_uses times: retired


# ----------------------------------------------------------------------------- the solver


def test_batched_cached_sampler_matches_uncached_sampling():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompts = torch.randint(512, (2, 5))
    G, n = 3, 6
    got = sample_groups(model, prompts, G, n, 1.0, torch.Generator().manual_seed(1))
    gen, seqs = torch.Generator().manual_seed(1), prompts.repeat_interleave(G, 0)
    with torch.no_grad():
        for _ in range(n):  # the slow way: rerun the whole sequence for every token
            probs = torch.softmax(model(seqs)[0][:, -1], -1)
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=gen)], 1)
    assert got.shape == (G * 2, n)
    assert torch.equal(got, seqs[:, 5:])


# ----------------------------------------------------------------------------- in the trainer


def make_trainer(store, book, **changes):
    store.create_model("sp", tiny_config())
    return runs.make_trainer(store, "sp", new_run([book], quick_train_config(selfplay_every=2, **changes)))


def test_one_selfplay_step_changes_the_weights_and_logs_every_component(store, book):
    tr = make_trainer(store, book)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m = tr.selfplay.step()
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    for key in ("reward", "prefix_match", "token_f1", "rep_score", "distinct_score", "kl", "pg_loss",
                "sup_loss", "learnability", "solve_rate", "entropy"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["kl"] == 0.0  # the reference is a copy of the policy: k3 is exactly 0
    assert 0.0 <= m["reward"] <= 1.0
    # the reference stays frozen while the policy moves
    assert not torch.equal(tr.selfplay.ref.transformer.wte.weight, tr.model.transformer.wte.weight)


def test_freerun_step_has_no_reference_terms(store, book):
    tr = make_trainer(store, book)
    tr.selfplay.cfg.freerun_every = 1  # every step is a free-run step
    m = tr.selfplay.step()
    assert m["freerun"] == 1.0 and "prefix_match" not in m
    assert tr.selfplay.free_P + tr.selfplay.free_new == tr.model.config.max_seq_len


def test_exact_resume_with_selfplay_on(store, book, book_text):
    """Stop at step 5 (self-play ran at 2 and 4) and resume: every later number is identical."""
    tc = quick_train_config(steps=8, selfplay_every=2, checkpoint_every=4, eval_every=4)
    store.create_model("whole", tiny_config())
    train(store, "whole", [book], tc)
    store.create_model("split", tiny_config())
    tok = store.model_dir("whole") / "tokenizer.json"
    (store.model_dir("split") / "tokenizer.json").write_bytes(tok.read_bytes())
    seen = []
    out = train(store, "split", [book], tc, on_event=seen.append, should_stop=lambda: len(seen) > 5)
    assert out["status"] == "stopped" and out["step"] == 5
    resume(store, "split")

    def rows(name):
        return {r["step"]: (r["loss"], r.get("val_bpb"), r.get("selfplay")) for r in store.metrics(name)}
    whole, split = rows("whole"), rows("split")
    assert sorted(split) == list(range(1, 9))
    assert split == whole
    assert whole[8][2]["reward"] >= 0.0 and whole[7][2] is None
