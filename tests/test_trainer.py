"""The training loop: it learns, it resumes exactly, its checkpoints are safe, it stops in time."""

import math
import time
from dataclasses import replace

import pytest
import torch

import azr_trainer
import evaluate
from app import runs
from app.records import new_run
from azr_trainer import TrainConfig
from muon import make_optimizer
from schedule import at_peak, decay_now, lr_at, lr_share
from conftest import quick_train_config, stop_and_resume, tiny_config
from files import CorruptFile, load_tensors, weights_of
from model import GPT
from app.runs import resume, train


def losses(store, name):
    return {r["step"]: r["loss"] for r in store.metrics(name)}


def test_training_lowers_the_validation_loss(store, book):
    store.create_model("m", tiny_config())
    events = []
    train(store, "m", [book], quick_train_config(steps=60, eval_every=20, learning_rate=1e-2), on_event=events.append)
    evals = [e["val_bpb"] for e in events if "val_bpb" in e]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    assert store.lineage("m")["best_val_bpb"] == min(evals)
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "done"


def test_stop_and_resume_reproduce_the_uninterrupted_run(store, book):
    for name in ("straight", "stopped"):
        store.create_model(name, tiny_config(dropout=0.1))  # dropout: the RNG state must resume too
    train(store, "straight", [book], quick_train_config(steps=16, checkpoint_every=4))
    summary = train(store, "stopped", [book], quick_train_config(steps=16, checkpoint_every=4),
                    should_stop=lambda: len(store.metrics("stopped")) >= 7)
    assert summary == {**summary, "status": "stopped", "step": 7}
    resume(store, "stopped")
    assert losses(store, "stopped") == losses(store, "straight")  # every step, bit for bit
    assert store.lineage("stopped")["steps"] == 16


def test_crash_resumes_from_the_last_checkpoint(store, book):
    store.create_model("straight", tiny_config())
    store.create_model("crashy", tiny_config())
    train(store, "straight", [book], quick_train_config(steps=12, checkpoint_every=4))

    def crash_at_step_10(event):
        if event["type"] == "step" and event["step"] == 10:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(store, "crashy", [book], quick_train_config(steps=12, checkpoint_every=4), on_event=crash_at_step_10)
    resume(store, "crashy")  # from step 8: steps 9-10 are redone, their old lines replaced
    assert losses(store, "crashy") == losses(store, "straight")
    assert [r["step"] for r in store.metrics("crashy")] == list(range(1, 13))


def test_a_truncated_checkpoint_is_rejected_and_the_previous_one_used(store, book):
    store.create_model("m", tiny_config())
    train(store, "m", [book], quick_train_config(steps=12, checkpoint_every=4),
          should_stop=lambda: len(store.metrics("m")) >= 10)
    ckpts = sorted(store.checkpoint_dir("m").glob("step_*.safetensors"))
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CorruptFile, match="damaged"):
        load_tensors(newest)
    trainer = runs.make_trainer(store, "m", runs.load_run(store, "m"))
    info = trainer.restore_latest()
    assert info["path"] == ckpts[-2].name and "damaged" in info["skipped"][0]


def test_a_flipped_byte_fails_the_checksum(store, book):
    store.create_model("m", tiny_config())
    path = store.model_dir("m") / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="checksum"):
        store.load_model("m")


def test_learning_rate_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(55, tc) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert lr_at(100, tc) == pytest.approx(1e-4)


def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor():
    tc = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1, schedule="wsd")
    lrs = [lr_at(step, tc) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] < lrs[5] < lrs[9]
    assert lrs[9:81] == pytest.approx([1e-3] * 72)  # flat until the last 20 steps
    assert lrs[90] == pytest.approx(0.55e-3)  # halfway down the line
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[100] == pytest.approx(1e-4)


def test_decay_now_makes_the_run_so_far_the_flat_part_of_a_shorter_run():
    tc = TrainConfig(steps=1000, warmup_steps=10, schedule="wsd")
    assert at_peak(400, tc) and not at_peak(5, tc) and not at_peak(850, tc)
    assert not at_peak(400, replace(tc, schedule="cosine"))  # a cosine is always coming down
    short = decay_now(400, tc)
    assert short.steps == 500 and lr_share(400, short) == 1 and not at_peak(401, short)
    assert lr_share(450, short) == pytest.approx(0.55)  # halfway down to the floor
    # in a time budget: 40 % of 10 minutes spent, so the run becomes 5 minutes with its decay from 80 %
    timed = decay_now(400, replace(tc, minutes=10), time_share=0.4)
    assert timed.minutes == pytest.approx(5) and at_peak(400, tc, 0.4) and not at_peak(400, timed, 0.8)


def test_weight_decay_only_on_matrices():
    opt = make_optimizer(GPT(tiny_config()), TrainConfig(optimizer="adamw"))
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_bits_per_byte_is_loss_in_bits_over_bytes(trained):
    store, name = trained
    t = runs.make_trainer(store, name, new_run(["book"], quick_train_config()))
    m = t.evaluate()
    x = torch.from_numpy(t.data["val"][: t.T + 1].astype("int64"))[None]
    with torch.no_grad():
        logits, _ = t.model(x[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    bytes_ = t.byte_len[x[0, 1:]].sum().item()
    one = evaluate.evaluate_bpb(t.model, t.data["val"][: t.T + 1], t.byte_len, t.T, 1, t.device)
    assert one["val_bpb"] == pytest.approx(nats / math.log(2) / bytes_, rel=1e-4)
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-3)


def test_unigram_baseline_is_beaten_by_a_trained_model(store, book):
    store.create_model("m", tiny_config())
    s = train(store, "m", [book], quick_train_config(steps=80, eval_every=80, learning_rate=3e-3))
    t = runs.make_trainer(store, "m", new_run([book], quick_train_config()))
    assert s["best_val_bpb"] < evaluate.unigram_bpb(t.data, t.byte_len)


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps"), (dict(learning_rate=5), "learning_rate"), (dict(batch_size=-1), "batch_size"),
    (dict(precision="fp8"), "precision"), (dict(seed=2**63), "seed"), (dict(batch_size="5"), "batch_size"),
    (dict(device="gpu9"), "device"),
])
def test_bad_training_options_are_explained(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad).validate()


def test_resume_without_a_run_is_a_clear_error(store):
    store.create_model("m", tiny_config())
    with pytest.raises(ValueError, match="no run to resume"):
        resume(store, "m")


def test_a_finished_run_keeps_its_best_weights(store, book, monkeypatch):
    """Early stopping: when val gets worse after step 20, the model ends on step 20's weights."""
    scores = iter([3.0, 2.0, 2.5])
    monkeypatch.setattr(azr_trainer.Trainer, "evaluate", lambda self: {"val_loss": 1.0, "val_ppl": 2.7, "val_bpb": next(scores)})
    store.create_model("m", tiny_config())
    summary = train(store, "m", [book], quick_train_config(steps=30, checkpoint_every=10, keep_checkpoints=5))
    assert summary["best"] == [2.0, 20]
    at_20, _ = load_tensors(store.checkpoint_dir("m") / "step_00000020.safetensors")
    final = store.load_model("m").state_dict()
    assert all(torch.equal(final[k[6:]], v) for k, v in at_20.items() if k.startswith("model."))


def test_a_new_run_never_resumes_from_an_old_runs_checkpoint(store, book):
    store.create_model("m", tiny_config())
    train(store, "m", [book], quick_train_config(steps=20, checkpoint_every=5))
    summary = train(store, "m", [book], quick_train_config(steps=20, checkpoint_every=5),
                    should_stop=lambda: sum(1 for r in store.metrics("m") if r["step"] <= 20) >= 20 + 3)
    assert summary["step"] == 3
    resumed = resume(store, "m")
    assert resumed["status"] == "done"
    second_run = [r["step"] for r in store.metrics("m")][20:]
    assert second_run == list(range(1, 21))  # steps 1-3, then 4-20 from the restart: not 11-20 of the old run


def fake_scores(monkeypatch, scores):
    """Trainer.evaluate answers with the next of `scores`: a hand-made val curve."""
    scores = iter(scores)
    monkeypatch.setattr(azr_trainer.Trainer, "evaluate",
                        lambda self: {"val_loss": 1.0, "val_ppl": 2.7, "val_bpb": next(scores)})


def test_early_stopping_ends_a_run_that_stopped_improving(store, book, monkeypatch):
    fake_scores(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 1.0])  # no better than step 20 for three evaluations
    store.create_model("m", tiny_config())
    events = []
    # a cosine: the learning rate is already coming down, so the plateau is the end
    summary = train(store, "m", [book], quick_train_config(steps=100, patience=3, schedule="cosine"),
                    on_event=events.append)
    assert summary["status"] == "done" and summary["step"] == 50 and summary["best"] == [2.0, 20]
    assert summary["end_reason"] == "early_stop" and events[-1]["end_reason"] == "early_stop"
    assert any(e["type"] == "info" and "early stop at step 50" in e["message"] for e in events)
    assert store.lineage("m")["runs"][-1]["steps"] == 50


def test_a_plateau_at_the_peak_learning_rate_starts_the_decay(store, book, monkeypatch):
    """WSD's flat phase: a plateau at step 50 takes the run back to step 20's weights and brings the
    learning rate down from there, over the last 20 % of a run now 63 steps long."""
    fake_scores(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 1.9, 1.8])
    store.create_model("m", tiny_config())
    events, kept_at_plateau = [], []
    decay = azr_trainer.Trainer.decay_from_plateau

    def spy(self, budget):
        decay(self, budget)
        kept = load_tensors(self.folder.ckpt_dir / "best.safetensors")[0]
        now = weights_of(self.model, trainable_only=True)
        kept_at_plateau.append(all(torch.equal(now[k], kept[k]) for k in kept))
    monkeypatch.setattr(azr_trainer.Trainer, "decay_from_plateau", spy)
    tc = quick_train_config(steps=100, patience=3, schedule="wsd")
    summary = train(store, "m", [book], tc, on_event=events.append)
    assert kept_at_plateau == [True]
    assert any(e["type"] == "info" and "plateau at step 50" in e["message"] and "step 20" in e["message"]
               and "ends at step 63" in e["message"] for e in events)
    assert summary["step"] == 63 and summary["end_reason"] == "plateau" and summary["best"] == [1.8, 63]
    lrs = [r["lr"] for r in store.metrics("m")]
    assert lrs[5:51] == [tc.learning_rate] * 46  # the peak until the plateau
    assert all(a > b for a, b in zip(lrs[51:], lrs[52:]))  # then down, step by step
    assert lrs[-1] < tc.learning_rate * 0.2


def test_exact_resume_after_a_plateau_started_the_decay(store, book, monkeypatch):
    """Stop at step 55, after the plateau at 50, and resume: the shortened run, row for row."""
    tc = quick_train_config(steps=100, patience=3, schedule="wsd", checkpoint_every=5)
    stopped, resumed = stop_and_resume(store, book, tc, 55,
                                       before=lambda: fake_scores(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 1.9, 1.8]))
    assert stopped["status"] == "stopped" and stopped["step"] == 55 and resumed["end_reason"] == "plateau"

    def rows(name):
        return [(r["step"], r["loss"], r["lr"]) for r in store.metrics(name)]
    assert rows("split") == rows("whole") and rows("whole")[-1][0] == 63


def test_a_plateau_in_a_time_budget_brings_its_end_in(store, book, monkeypatch):
    """The same in a 12-second budget: the plateau at step 50 comes a few seconds in, and the run
    ends at a quarter more than the time it had run (loosely: a behaviour, not a timing test)."""
    fake_scores(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7] + [1.9] * 10**4)
    store.create_model("m", tiny_config())
    events = []
    tc = quick_train_config(steps=10**6, minutes=0.2, patience=3, schedule="wsd", checkpoint_every=10**6)
    summary = train(store, "m", [book], tc, on_event=events.append)
    steps = [e for e in events if e["type"] == "step"]
    at_plateau = next(e for e in steps if e["step"] == 50)
    assert summary["end_reason"] == "plateau" and steps[-1]["budget_s"] < 12
    assert steps[-1]["elapsed_s"] == pytest.approx(at_plateau["elapsed_s"] / 0.8, abs=1.0)
    meta = load_tensors(sorted(store.checkpoint_dir("m").glob("step_*.safetensors"))[-1])[1]
    assert meta["minutes"] * 60 == pytest.approx(steps[-1]["budget_s"], abs=0.1)  # a resume keeps the new end


def test_early_stopping_waits_out_a_plateau(store, book, monkeypatch):
    # within 1 % of the best (2.0) for six evaluations, then a new best: what a high learning rate
    # looks like before the cosine comes down; one clear rise (2.1) in between is not three in a row
    scores = iter([3.0, 2.0, 2.01, 2.015, 2.1, 2.005, 2.0, 2.01, 1.9, 1.95])
    monkeypatch.setattr(azr_trainer.Trainer, "evaluate", lambda self: {"val_loss": 1.0, "val_ppl": 2.7, "val_bpb": next(scores)})
    store.create_model("m", tiny_config())
    summary = train(store, "m", [book], quick_train_config(steps=100, patience=3))
    assert summary["step"] == 100 and summary["best"] == [1.9, 90]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_time_budget_fits_the_schedule_and_ends_on_time(store, book, schedule):
    store.create_model("m", tiny_config())
    t0 = time.time()
    summary = train(store, "m", [book], quick_train_config(steps=10**6, minutes=0.25, patience=0, eval_every=50,
                                                           checkpoint_every=10**6, schedule=schedule))
    wall = time.time() - t0  # the budget counts the whole run: tokenizer, token arrays, training
    rows = store.metrics("m")
    assert 0.9 * 15 <= wall <= 1.3 * 15, wall  # loosely: a behaviour, not a timing test
    assert summary["step"] == rows[-1]["step"] == summary["total"] < 10**6 and "val_bpb" in rows[-1]
    assert summary["end_reason"] == "budget"
    tc = quick_train_config()
    assert rows[-1]["lr"] < tc.learning_rate * (tc.min_lr_ratio + 0.3)  # the schedule came down by the end
    if schedule == "wsd":  # the decay starts at about 80 % of the time: the run's length is known in time
        peak = max(r["lr"] for r in rows)
        decay_start = next(r["time"] for r in rows if r["step"] > tc.warmup_steps and r["lr"] < peak)
        assert 0.7 * 15 <= decay_start - t0 <= 0.9 * 15, decay_start - t0
