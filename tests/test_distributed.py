"""Training on two processes: torchrun starts two ranks of cli.py, gloo connects them on the CPU.

Two ranks with batch B train like one process with batch 2B; rank 0 alone writes into the store;
a run killed on one rank resumes bit for bit; an error on one rank ends the whole job with it.
Each run is a real `torchrun --standalone --nproc_per_node 2`, of a tiny model, for a few steps.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import distributed
from azr_trainer import TrainConfig
from conftest import ROOT, tiny_config
from files import load_tensors
from app.runs import resume, train
from app.store import Store

# the options of every run here; flags for the CLI, a TrainConfig for the one-process run
OPTS = dict(steps=12, batch_size=4, eval_every=4, eval_batches=2, checkpoint_every=4, keep_checkpoints=5,
            warmup_steps=3, seed=7, precision="fp32", device="cpu")
FLAGS = [a for k, v in OPTS.items() for a in (f"--{k.replace('_', '-')}", str(v))]

# cli.py under torchrun, with two instruments for the tests, each switched on by a variable:
# AZR_TEST_WRITES=DIR logs what this rank writes (Python's audit events, PEP 578) to DIR/rankN.log;
# AZR_TEST_FAULT=kill:R:S or raise:R:S makes rank R die by SIGKILL, or raise, at its step S;
# AZR_TEST_WEIGHTS=DIR saves each rank's weights at the end of its run to DIR/rankN.pt;
# AZR_TEST_CURVE='{"step": val_bpb, ...}' makes rank 0's evaluations a hand-made val curve.
WORKER = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
rank = int(os.environ["RANK"])
if os.environ.get("AZR_TEST_WRITES"):
    log = open(os.path.join(os.environ["AZR_TEST_WRITES"], f"rank{rank}.log"), "a")  # before the hook
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def written(event, args):
        if event == "open":
            return args[0] if isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & WRITES else None
        if event == "os.rename":
            return args[1]
        if event == "os.mkdir":
            return None if os.path.exists(args[0]) else args[0]
        if event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            return args[0]
    def audit(event, args):
        path = written(event, args)
        if path is not None:
            log.write(os.path.abspath(os.fsdecode(path)) + "\\n")
            log.flush()
    sys.addaudithook(audit)
import azr_trainer, cli
if os.environ.get("AZR_TEST_FAULT"):
    how, who, at = os.environ["AZR_TEST_FAULT"].split(":")
    one_step = azr_trainer.Trainer._one_step
    def faulty_step(self):
        if int(who) == rank and self.step + 1 == int(at):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"rank {rank} fails on purpose at step {at}")
        return one_step(self)
    azr_trainer.Trainer._one_step = faulty_step
if os.environ.get("AZR_TEST_WEIGHTS"):  # every rank saves its weights at the end of its run
    import torch
    run = azr_trainer.Trainer.run
    def run_and_save(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        torch.save(self.model.state_dict(), os.path.join(os.environ["AZR_TEST_WEIGHTS"], f"rank{rank}.pt"))
        return out
    azr_trainer.Trainer.run = run_and_save
if os.environ.get("AZR_TEST_CURVE"):
    import json
    curve = {int(k): v for k, v in json.loads(os.environ["AZR_TEST_CURVE"]).items()}
    azr_trainer.Trainer.evaluate = lambda self, max_windows=None: {"val_loss": 1.0, "val_bpb": curve[self.step]}
sys.exit(cli.main(sys.argv[1:]))
"""


def torchrun(tmp, home, *args, timeout=300, **env):
    """Two ranks of cli.py --home HOME ARGS; -> the finished process (stdout, stderr, returncode)."""
    return subprocess.run(torchrun_command(tmp, home, *args), cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def torchrun_command(tmp, home, *args):
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(worker), "--home", str(home), *args]


def losses(store, name):
    return {r["step"]: r["loss"] for r in store.metrics(name)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, book_text):
    """One finished two-process run of model "m" (batch 4 per rank), with each rank's writes
    logged: -> (store, {rank: {paths it wrote into the store}}, {files the run changed})."""
    tmp = tmp_path_factory.mktemp("ddp")
    store = Store(tmp / "home")
    store.books.add("book", book_text.encode(), "book.txt")
    store.create_model("m", tiny_config())
    (tmp / "writes").mkdir()
    started = time.time()
    out = torchrun(tmp, store.home, "train", "m", "--book", "book", *FLAGS, AZR_TEST_WRITES=str(tmp / "writes"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["status"] == "done"
    lines = out.stdout.splitlines()
    assert sum(line.startswith("{") for line in lines) == sum(line.startswith("step 4:") for line in lines) == 1  # rank 0's
    logs = {r: (tmp / "writes" / f"rank{r}.log").read_text().splitlines() for r in (0, 1)}
    locks = str(store.home / "locks")  # lock files hold no data: every reader of a book takes its lock
    into_store = {r: {p for p in paths if p.startswith(str(store.home)) and not p.startswith(locks)}
                  for r, paths in logs.items()}
    changed = {str(p) for p in store.home.rglob("*") if p.is_file() and p.stat().st_mtime >= started
               and not str(p).startswith(locks)}
    return store, into_store, changed


def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(two_ranks):
    """Each rank takes its half of the windows one process draws for the global batch, so the
    data are the same, and the average of the two ranks' mean gradients is the mean gradient of
    the 2B windows. Only the order of float additions differs (two means over 4 windows averaged
    vs one over 8, matmuls of 4 rows vs 8): fp32 rounding, about 1e-7 of each value. So the
    metrics (rounded to 5 digits in metrics.jsonl) agree to their last digit, and the weights
    after 12 steps to 1e-5 (measured: 6e-7), where one AdamW step moves each weight by about
    the learning rate, 2e-3: windows or gradients that differ at all would show."""
    store, _, _ = two_ranks
    store.create_model("one", tiny_config())  # the same seed: the same initial weights as "m"
    train(store, "one", ["book"], TrainConfig(**{**OPTS, "batch_size": 2 * OPTS["batch_size"]}))
    two, one = store.metrics("m"), store.metrics("one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))
    for a, b in zip(two, one):
        # a row without a validation score has none in both runs; the values present agree
        assert a.keys() == b.keys()
        keys = [k for k in ("loss", "grad_norm", "val_bpb", "lr") if k in b]
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=2e-5, abs=2e-5)
    wa, wb = store.load_model("m").state_dict(), store.load_model("one").state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)
    assert store.lineage("m")["runs"][-1]["world_size"] == 2


def test_only_rank_0_writes_into_the_store(two_ranks):
    store, into_store, changed = two_ranks
    assert into_store[1] == set()

    def by_rank_0(path):  # written, or inside a folder rank 0 made or renamed into place
        return any(path == w or path.startswith(w + "/") for w in into_store[0])

    assert changed and all(by_rank_0(p) for p in changed)
    m, ckpt = store.model_dir("m"), store.checkpoint_dir("m")
    for name in (m / "metrics.jsonl", m / "model.safetensors", m / "lineage.json", ckpt / "run.json",
                 ckpt / "step_00000004.safetensors", m / "versions" / "v001" / "model.safetensors"):
        assert str(name) in changed


def test_a_checkpoint_holds_the_rng_states_of_every_rank(two_ranks):
    store, _, _ = two_ranks
    tensors, _ = load_tensors(store.checkpoint_dir("m") / "step_00000008.safetensors")
    dropout = tensors["rng.torch"]  # (world_size, bytes): each rank's own stream
    assert dropout.shape[0] == 2 and not torch.equal(dropout[0], dropout[1])
    assert torch.equal(tensors["rng.batch"][0], tensors["rng.batch"][1])  # one stream, a slice each


def test_a_two_process_run_killed_on_one_rank_resumes_bit_for_bit(two_ranks, tmp_path):
    """Rank 1 dies by SIGKILL (as by the OOM killer) at step 7; torchrun stops rank 0. The
    resume, on two processes again, continues from the checkpoint of step 4 exactly as a
    straight run (alongside) goes on. With dropout, so each rank's own RNG must come back."""
    store, _, _ = two_ranks
    for name in ("straight", "killed"):
        store.create_model(name, tiny_config(dropout=0.1))
    log = open(tmp_path / "straight.log", "w")
    straight = subprocess.Popen(torchrun_command(tmp_path, store.home, "train", "straight", "--book", "book", *FLAGS),
                                cwd=ROOT, stdout=log, stderr=log)
    out = torchrun(tmp_path, store.home, "train", "killed", "--book", "book", *FLAGS, AZR_TEST_FAULT="kill:1:7")
    assert out.returncode != 0
    assert max(losses(store, "killed")) <= 7
    out = torchrun(tmp_path, store.home, "resume", "killed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert straight.wait(300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert losses(store, "killed") == losses(store, "straight")  # every step, bit for bit
    a, b = store.load_model("killed").state_dict(), store.load_model("straight").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_self_play_on_two_processes_rolls_out_apart_and_keeps_the_weights_equal(two_ranks, tmp_path):
    """Each rank rolls out its own contexts (its own proposer RNG); the self-play gradients are
    averaged, so after the run both ranks hold the same weights. Without the average they would
    part at the first self-play step (keep-best off: rank 0 alone would go back to a best)."""
    store, _, _ = two_ranks
    store.create_model("sp", tiny_config())
    out = torchrun(tmp_path, store.home, "train", "sp", "--book", "book", *FLAGS, "--selfplay-every", "2",
                   "--selfplay-start", "0", "--no-keep-best", AZR_TEST_WEIGHTS=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in store.metrics("sp") if "selfplay" in r] == list(range(2, 13, 2))
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    tensors, meta = load_tensors(store.checkpoint_dir("sp") / "step_00000008.safetensors")
    assert "selfplay" in meta and "selfplay1" in meta  # each rank's proposer, for an exact resume
    assert not torch.equal(tensors["selfplay.rng"], tensors["selfplay1.rng"])


def test_a_plateau_and_its_decay_with_selfplay_on_two_processes(two_ranks, tmp_path):
    """A plateau at the peak (step 8, rank 0's evaluations) starts the decay on both ranks, with
    self-play in its tail, and the run ends at 10 = 8 / 0.8, both ranks alike (keep-best off, as above)."""
    store, _, _ = two_ranks
    store.create_model("pl", tiny_config())
    curve = {2: 2.5, 4: 2.0, 6: 2.1, 8: 2.1, 10: 1.9, 12: 1.9, 14: 1.9, 16: 1.9}
    out = torchrun(tmp_path, store.home, "train", "pl", "--book", "book", *FLAGS, "--steps", "16", "--eval-every",
                   "2", "--patience", "2", "--schedule", "wsd", "--selfplay-every", "3", "--no-keep-best",
                   AZR_TEST_WEIGHTS=str(tmp_path), AZR_TEST_CURVE=json.dumps(curve))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plateau at step 8" in out.stdout
    rows = {r["step"]: r for r in store.metrics("pl")}
    assert sorted(rows) == list(range(1, 11)) and [s for s in rows if "selfplay" in rows[s]] == [9]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_resuming_on_another_number_of_processes_says_it_is_not_bit_exact(two_ranks):
    """The two-process run, as if stopped after its checkpoint of step 8, goes on in one process."""
    store, _, _ = two_ranks
    for d in ("models", "checkpoints"):
        shutil.copytree(store.home / d / "m", store.home / d / "m2")
    run = json.loads((store.checkpoint_dir("m2") / "run.json").read_text())
    (store.checkpoint_dir("m2") / "run.json").write_text(json.dumps({**run, "status": "stopped"}))
    events = []
    summary = resume(store, "m2", on_event=events.append)
    notes = [e["message"] for e in events if e["type"] == "warning"]
    assert len(notes) == 1 and "world size 2" in notes[0] and "not bit-exact" in notes[0]
    assert summary["status"] == "done" and [r["step"] for r in store.metrics("m2")] == list(range(1, 13))
    assert store.lineage("m2")["runs"][-1]["world_size"] == 1


def test_an_error_on_one_rank_ends_the_job_with_that_error(two_ranks, tmp_path):
    """Rank 1 raises at step 3 while rank 0 waits for its gradients. torchrun sees the rank exit
    and stops the other at once, long before distributed.TIMEOUT would end a rank that hangs."""
    store, _, _ = two_ranks
    store.create_model("failing", tiny_config())
    t0 = time.time()
    out = torchrun(tmp_path, store.home, "train", "failing", "--book", "book", *FLAGS, timeout=240,
                   AZR_TEST_FAULT="raise:1:3")
    assert out.returncode != 0
    assert "RuntimeError: rank 1 fails on purpose at step 3" in out.stderr
    assert time.time() - t0 < distributed.TIMEOUT.total_seconds()
