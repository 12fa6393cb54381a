"""Self-play: the repetition marker and its book allowance, the loss, the proposer, blocked
rollouts, one step through the narrow interface, exact resume, and in the trainer: the plateau
switch, keep-best by greedy repeats, resume across the switch."""

import copy
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
import torch

import azr_trainer
import cli
import config
import schedule
from azr_trainer import TrainConfig, selfplay_due
from keep_best import STOP_RISE, kept_better
from conftest import quick_train_config, stop_and_resume, tiny_config
from files import load_tensors, weights_of
from generate import rollouts
from model import GPT
from app.runs import train
from selfplay import (Proposer, SelfPlay, SelfPlayConfig, banned_next, book_allowance, learnability, mark_repeats,
                      pair_loss)

# ----------------------------------------------------------------------------- marking


def test_mark_repeats_marks_the_tokens_that_complete_a_repeated_ngram():
    loop = [1, 2, 3, 4, 1, 2, 3, 4, 1]
    # the 4-gram (1 2 3 4) first completes at index 3; it repeats at index 7; (2 3 4 1) at 8
    assert mark_repeats(loop, 4, {}) == [False] * 7 + [True, True]
    assert not any(mark_repeats(list(range(20)), 4, {}))


def test_the_book_allowance_lets_a_refrain_repeat_as_often_as_in_the_book():
    refrain = (7, 8, 9, 10)
    text = [*refrain, 1, *refrain, 2, *refrain]  # the refrain completes at 3, 8 and 13
    assert [i for i, m in enumerate(mark_repeats(text, 4, {})) if m] == [8, 13]
    assert [i for i, m in enumerate(mark_repeats(text, 4, {refrain: 1})) if m] == [13]  # book repeats it once
    assert not any(mark_repeats(text, 4, {refrain: 2}))


def test_book_allowance_matches_counting_every_window():
    data = np.random.default_rng(0).integers(0, 4, 2000)
    n, window = 3, 16
    best = {}
    for s in range(len(data) - window + 1):
        for g, k in Counter(tuple(int(t) for t in data[i:i + n]) for i in range(s, s + window - n + 1)).items():
            best[g] = max(best.get(g, 0), k - 1)
    assert book_allowance(data, n, window) == {g: k for g, k in best.items() if k > 0}


# ----------------------------------------------------------------------------- the proposer


def test_pair_loss_is_unlikelihood_inside_the_pair_and_moves_only_those_two_logits():
    logits = torch.zeros(1, 1, 5, requires_grad=True)  # p~(repeat) = 1/2 inside the pair
    loss = pair_loss(logits, torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([[True]]))
    assert loss.item() == pytest.approx(np.log(2))
    loss.backward()
    g = logits.grad[0, 0]
    assert g[3] > 0 and g[1] < 0 and g[[0, 2, 4]].abs().sum() == 0  # no mass goes to other tokens
    assert pair_loss(logits, torch.tensor([[-1]]), torch.tensor([[1]]), torch.tensor([[False]])).item() == 0


def test_proposer_keeps_contexts_that_looped_and_prefers_sometimes_to_always():
    prop = Proposer(size=2, explore=0.0, max_visits=10)
    prop.update([10, 20], [True, False])
    assert list(prop.buffer) == [10]  # never looped: nothing to unlearn
    prop.update([10, 30, 30, 30], [False, True, True, True])
    assert learnability(*prop.buffer[10]) > learnability(*prop.buffer[30])  # 1 of 2 vs 3 of 3
    prop.update([40, 40], [True, False])  # over capacity: the always-looper (30) goes
    assert sorted(prop.buffer) == [10, 40]
    starts, picked = prop.propose(20, high=1000, gen=torch.Generator().manual_seed(0))
    assert set(starts) <= {10, 40} and all(picked)


# ----------------------------------------------------------------------------- rollouts and steps


class Harness:
    """A model, an optimizer and a data stream, as the trainer hands them to SelfPlay."""

    def __init__(self, seed=0, **cfg):
        torch.manual_seed(seed)
        self.model = GPT(tiny_config())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.data = np.random.default_rng(0).integers(0, 512, 2000).astype(np.uint16)  # a "book"
        cfg = SelfPlayConfig(rollouts=4, prompt_tokens=8, new_tokens=16, **cfg)
        self.sp = SelfPlay(self.model, self.step, self.data, "fp32", seed, cfg)

    def step(self, loss):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.item()


def test_a_step_logs_its_numbers_and_changes_the_weights():
    h = Harness()
    before = copy.deepcopy(h.model.state_dict())
    m = h.sp.step()
    for key in ("sp_loss", "repeat_rate", "reward", "looping", "buffer_size", "from_buffer", "learnability", "grad_norm"):
        assert np.isfinite(m[key]), key
    assert m["repeat_rate"] > 0 and m["sp_loss"] > 0  # an untrained model wants to repeat itself
    assert m["reward"] == pytest.approx(1 - m["repeat_rate"])
    ex = m["example"]  # ... but the blocked rollout does not, and says what it pushed down
    assert not any(mark_repeats(ex["tokens"], 4, {})) and any(w >= 0 for w in ex["pushed_down"])
    assert any(not torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


def test_resume_from_state_continues_bit_for_bit():
    a = Harness()
    for _ in range(3):
        a.sp.step()
    saved = (copy.deepcopy(a.model.state_dict()), copy.deepcopy(a.opt.state_dict()), a.sp.state())
    rest = [a.sp.step() for _ in range(3)]
    b = Harness(seed=1)  # other weights and RNGs: everything must come from the saved state
    b.model.load_state_dict(saved[0])
    b.opt.load_state_dict(saved[1])
    b.sp.load_state(*saved[2])
    assert [b.sp.step() for _ in range(3)] == rest
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in b.model.state_dict().items())


def test_banned_next_blocks_the_token_that_would_repeat_an_ngram():
    assert banned_next([1, 2, 3, 9, 1, 2], 3, {}) == [3]  # (1 2 3) is there: 3 may not follow (1 2) again
    assert banned_next([1, 2, 3, 9, 1, 2], 3, {(1, 2, 3): 1}) == []  # the book repeats it once
    assert banned_next([1, 2], 3, {}) == []


def test_blocked_rollout_never_repeats_an_ngram_and_records_what_greedy_wanted():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompts = torch.randint(512, (3, 5))
    free = rollouts(model, prompts, 20)
    outs, blocked = rollouts(model, prompts, 20, ban=lambda rows: [banned_next(r, 4, {}) for r in rows])
    assert (blocked >= 0).any()
    for row in outs.tolist():
        assert not any(mark_repeats(row, 4, {}))
    first = (blocked >= 0).float().argmax(1)  # up to the first block, blocked greedy is plain greedy
    for r in range(3):
        if (blocked[r] >= 0).any():
            f = int(first[r])
            assert torch.equal(outs[r, :f], free[r, :f]) and blocked[r, f] == free[r, f]


def test_a_selfplay_step_lowers_the_probability_of_a_looping_continuation():
    """Train the model into a loop, then self-play: the repeat it wanted becomes less likely there."""
    h = Harness()
    loop = torch.tensor([[5, 6, 7, 8] * 8])  # (1, 32)
    for _ in range(30):  # supervised steps on the loop: the model learns to continue it
        h.step(h.model(loop[:, :-1], loop[:, 1:])[1])
    h.sp.data = np.tile(np.array([5, 6, 7, 8], dtype=np.uint16), 100)  # contexts from the looping "book"
    h.sp.allow = {}  # ... but allow no repeats
    ctx = loop[:, :12]

    def p_repeat():
        with torch.no_grad():
            return h.model(ctx)[0][0, -1].softmax(-1)[5].item()  # the loop's next token
    before = p_repeat()
    for _ in range(5):
        h.sp.step()
    assert p_repeat() < before / 2


# ----------------------------------------------------------------------------- in the trainer


def test_exact_resume_with_selfplay_on(store, book):
    """Stop at step 5 (self-play ran at 2 and 4) and resume: every later number is identical."""
    tc = quick_train_config(steps=8, selfplay_every=2, selfplay_start=0.0, checkpoint_every=4, eval_every=4)
    stopped, _ = stop_and_resume(store, book, tc, 5)
    assert stopped["status"] == "stopped" and stopped["step"] == 5

    def rows(name):
        return {r["step"]: (r["loss"], r.get("val_bpb"), r.get("selfplay")) for r in store.metrics(name)}
    whole, split = rows("whole"), rows("split")
    assert sorted(split) == list(range(1, 9))
    assert split == whole
    assert whole[8][2]["repeat_rate"] >= 0.0 and whole[7][2] is None


def test_selfplay_waits_for_its_start(store, book):
    store.create_model("m", tiny_config())
    train(store, "m", [book], quick_train_config(steps=10, selfplay_every=2, selfplay_start=0.5))
    assert [r["step"] for r in store.metrics("m") if "selfplay" in r] == [6, 8, 10]


def test_greedy_repeats_is_the_share_of_plain_greedy_tokens_that_repeat():
    h = Harness()
    val = np.random.default_rng(1).integers(0, 512, 500).astype(np.uint16)
    r = h.sp.greedy_repeats(val)
    assert 0 < r < 1 and r == h.sp.greedy_repeats(val)  # an untrained model loops; no RNG involved
    assert h.model.training


# ----------------------------------------------------------------------------- the schedule


def test_selfplay_is_due_in_the_tail_every_n_steps_and_never_when_off():
    tc = TrainConfig(steps=100, selfplay_every=3, selfplay_start=0.8)
    assert [s for s in range(1, 101) if selfplay_due(s, tc)] == [81, 84, 87, 90, 93, 96, 99]
    assert not any(selfplay_due(s, TrainConfig(steps=100, selfplay_every=0)) for s in range(1, 101))


def test_keep_best_prefers_fewer_repeats_within_the_tolerance():
    best = 2.0
    kept = [2.0, 100, 0.30]
    assert kept_better([2.0 * (1 + STOP_RISE) - 1e-6, 200, 0.10], kept, best)  # within 1 %, loops less
    assert not kept_better([2.0 * (1 + STOP_RISE) + 1e-6, 200, 0.0], kept, best)  # loops never, but too far
    assert not kept_better([2.01, 200, 0.31], kept, best)  # within, but loops more
    assert kept_better([1.9, 300, 0.50], kept, 1.9)  # a new best pushes the kept one out of the tolerance
    assert kept_better([1.9, 300, None], [2.0, 100, None], 1.9)  # self-play off: the best, as always
    assert not kept_better([2.05, 300, None], [2.0, 100, None], 2.0)


def fake_curve(monkeypatch, curve, repeats):
    """Trainer.evaluate answers from a hand-made curve: {step: val_bpb} and {step: greedy_repeats}."""
    def evaluate(self, max_windows=None):
        return {"val_loss": curve[self.step], "val_bpb": curve[self.step], "greedy_repeats": repeats[self.step]}
    monkeypatch.setattr(azr_trainer.Trainer, "evaluate", evaluate)


# val falls to 2.00 at step 4, then climbs more than 1 % for 3 evaluations: the plateau at step 10
CURVE = {2: 2.5, 4: 2.0, 6: 2.1, 8: 2.1, 10: 2.1, 12: 2.015, 14: 2.005, 16: 2.3, 18: 2.3, 20: 2.3}
REPEATS = {2: 0.5, 4: 0.4, 6: 0.4, 8: 0.4, 10: 0.4, 12: 0.1, 14: 0.2, 16: 0.0, 18: 0.0, 20: 0.0}
# self-play from the plateau on; a cosine, so the plateau is not in WSD's flat phase (where it would
# start the decay first: tests/test_trainer.py)
PLATEAU = dict(selfplay_every=3, selfplay_start=1.0, schedule="cosine")


def test_a_plateau_switches_the_run_into_selfplay_and_keep_best_weighs_repeats(store, book, monkeypatch):
    fake_curve(monkeypatch, CURVE, REPEATS)
    events = []
    store.create_model("m", tiny_config())
    tc = quick_train_config(steps=40, eval_every=2, checkpoint_every=4, **PLATEAU)
    out = train(store, "m", [book], tc, on_event=events.append)
    rows = {r["step"]: r for r in store.metrics("m")}
    assert all("loss" in rows[s] and "selfplay" not in rows[s] for s in range(1, 11))  # supervised until the plateau
    assert all("loss" not in rows[s] and "selfplay" in rows[s] for s in range(11, 17))  # then self-play only
    assert any(e["type"] == "info" and "plateau at step 10" in e["message"] for e in events)
    # 16, 18, 20 are 3 evaluations over 1 % above the best after the switch: the run ends there,
    # on step 12's weights: within 1 % of the best (2.0) and the fewest repeats (14 is closer, loops more)
    assert out["step"] == 20 and out["best"] == [2.015, 12]
    assert rows[11]["lr"] == schedule.lr_at(10, tc)


def test_the_cli_progress_bar_follows_a_run_through_the_plateau(store, book, monkeypatch, capsys):
    """After the switch a step row has no supervised loss: the command line's bar shows it anyway."""
    fake_curve(monkeypatch, CURVE, REPEATS)
    store.create_model("m", tiny_config())
    with cli.ProgressBar() as bar:
        train(store, "m", [book], quick_train_config(steps=40, eval_every=2, **PLATEAU),
              on_event=bar.update)
    assert "plateau at step 10" in capsys.readouterr().out


def test_the_plateau_goes_back_to_the_kept_weights(store, book, monkeypatch):
    fake_curve(monkeypatch, CURVE, REPEATS)
    seen = []
    switch = azr_trainer.Trainer.switch_to_selfplay

    def spy(self):
        kept, meta = load_tensors(self.folder.ckpt_dir / "best.safetensors")
        last = {k: v.clone() for k, v in weights_of(self.model, trainable_only=True).items()}
        switch(self)
        now = weights_of(self.model, trainable_only=True)
        seen.append((meta["step"], all(torch.equal(now[k], kept[k]) for k in kept),
                     any(not torch.equal(now[k], last[k]) for k in kept)))
    monkeypatch.setattr(azr_trainer.Trainer, "switch_to_selfplay", spy)
    store.create_model("m", tiny_config())
    train(store, "m", [book], quick_train_config(steps=40, eval_every=2, **PLATEAU))
    assert seen == [(4, True, True)]  # step 4's weights, not step 10's


def test_exact_resume_after_the_plateau_switch(store, book, monkeypatch):
    """Stop at step 13, after the switch at 10, and resume: every later row is the same."""
    fake_curve(monkeypatch, CURVE, REPEATS)
    tc = quick_train_config(steps=40, eval_every=2, checkpoint_every=4, **PLATEAU)
    stopped, resumed = stop_and_resume(store, book, tc, 13)
    assert stopped["status"] == "stopped" and stopped["step"] == 13 and resumed["step"] == 20

    def rows(name):
        return {r["step"]: (r.get("loss"), r.get("selfplay")) for r in store.metrics(name)}
    assert rows("split") == rows("whole")
    a, b = store.load_model("split").state_dict(), store.load_model("whole").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_api_defaults_are_trainconfigs():
    """Whatever the default of self-play is, the CLI and the API take it from TrainConfig."""
    import cli
    from app.web.training import TrainRequest
    args = cli.build_parser().parse_args(["train", "m", "--book", "b"])
    assert TrainConfig.from_dict(cli.given(args, TrainConfig)) == TrainConfig()
    body = TrainRequest(model="m")
    for name in ("selfplay_every", "selfplay_start", "patience", "keep_best", "minutes"):
        assert getattr(body, name) == getattr(TrainConfig(), name), name
    field = next(f for f in fields(TrainConfig) if f.name == "selfplay_every")
    assert f"default {TrainConfig().selfplay_every})" in config.help_text(field)
