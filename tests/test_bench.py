"""python -m bench --quick: a tiny model through every measurement, checked for shape, not for speed
(speed claims live in BENCHMARKS.md, measured side by side with the peer)."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import model as M
import sizing
import speed
from app.records import new_run
from app.runs import train
from azr_trainer import TrainConfig, Trainer
from bench.common import format_report
from bench.speed import step_matmuls
from model import GPT
from speed import CompileProbe, compile_decision, compile_pays
from conftest import ROOT, quick_train_config, tiny_config


@pytest.fixture(scope="module")
def quick():
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_train_rows_compare_us_with_the_identical_peer(quick):
    assert [(r["preset"], r["precision"]) for r in quick["train"]][0] == ("quick", "fp32")
    for row in quick["train"]:
        assert row["peer_params"] == row["params"]  # same config, same parameter count
        for key in ["ours_tok_s", "ours_mfu", "ours_peak_mb", "matmul_only_tok_s", "peer_tok_s", "ours_ratio",
                    "peer_mfu", "peer_peak_mb", "matmul_only_ratio"]:
            assert row[key] > 0, key
        assert row["ours_peak_mb"] > row["params"] * 4 / 2**20  # at least the weights


def test_generation_rows_have_cached_uncached_and_peer_speeds(quick):
    for row in quick["generate"]:
        assert row["new_tokens"] == 8
        assert min(row["ours_cache_tok_s"], row["ours_no_cache_tok_s"]) > 0
        assert row["peer_tok_s"] > 0 and row["ratio"] > 0  # the peer: transformers, in requirements.txt


def test_peaks_nf4_and_machine_are_reported(quick):
    assert quick["peak_gflops"]["fp32"] > 0
    assert quick["meta"]["threads"] >= 1 and quick["meta"]["cpu"]
    if quick["nf4"] is not None:  # quant.py present
        assert 4 < quick["nf4"]["bits_per_param"] < 4.5
        assert quick["nf4"]["quantize_mparams_s"] > 0 and quick["nf4"]["dequantize_mparams_s"] > 0


def test_markdown_report_has_a_row_per_measurement():
    fake = {"meta": {"date": "d", "cpu": "c", "cpu_capability": "x", "threads": 2, "device": "cpu", "torch": "t",
                     "transformers": None, "loadavg_start": None, "command": "python -m bench"},
            "peak_gflops": {"fp32": 100.0}, "nf4": None,
            "train": [{"preset": "quick", "precision": "fp32", "batch": 4, "seq_len": 32, "ours_tok_s": 1000.0,
                       "ours_mfu": 0.5, "matmul_only_tok_s": 3000.0, "ours_peak_mb": 2.0, "estimate_mb": 2.0,
                       "ours_setup_s": 1.0}],
            "generate": [{"preset": "quick", "precision": "fp32", "new_tokens": 8, "ours_cache_tok_s": 50.0,
                          "ours_no_cache_tok_s": 10.0, "peer_tok_s": None, "ratio": None}]}
    text = format_report(fake)
    assert "| quick | fp32 | 4 x 32 | 1,000 | - |" in text and "| quick | fp32 | 8 | 50 | 10 | - | - |" in text


def test_matmul_only_ceiling_counts_every_matmul_of_a_step():
    cfg = M.PRESETS["small"]
    flops = sum(2 * b * m * k * n * count for (b, m, k, n), count in step_matmuls(cfg, 16, 128).items())
    assert flops == pytest.approx(sizing.flops_per_token(cfg, 128) * 16 * 128, rel=0.01)  # 6N + attention, minus biases


# ----------------------------------------------------------------------------- the speed tricks


def test_written_out_attention_used_under_compile_matches_the_fused_kernel():
    torch.manual_seed(0)
    gpt = M.GPT(tiny_config())
    idx = torch.randint(0, 512, (2, 32))

    def logits_loss_grads():
        gpt.zero_grad()
        logits, loss = gpt(idx, idx)
        loss.backward()
        return logits, [p.grad.clone() for p in gpt.parameters()]

    logits, grads = logits_loss_grads()
    for m in gpt.modules():
        if isinstance(m, M.CausalSelfAttention):
            m.fused = False  # what speed.compile_loss sets on CPU
    logits2, grads2 = logits_loss_grads()
    assert torch.allclose(logits, logits2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads2))


def test_on_and_off_are_obeyed_and_auto_probes_only_runs_long_enough_to_pay():
    cpu = torch.device("cpu")
    assert compile_decision("on", cpu, 1)[0] is True and compile_decision("off", cpu, 1e15)[0] is False
    if not shutil.which("g++"):
        assert compile_decision("auto", cpu, 1e15) == (False, "no C++ compiler for inductor's kernels")
        return
    on, reason = compile_decision("auto", cpu, 1e9, precision="bf16")
    assert (on, reason) == (False, "a short run (1.0e+09 FLOPs): compiling would not pay back")
    on, reason = compile_decision("auto", cpu, 1e15, minutes=0.5, precision="bf16")  # a budget: its length decides
    assert on is False and "0.5-minute budget" in reason
    assert compile_decision("auto", cpu, 1e15, minutes=3, precision="bf16")[0] is None  # long enough: measure first
    # fp32 on a CPU: the best gain compiling has given there cannot win back a probe in 3 minutes
    on, reason = compile_decision("auto", cpu, 1e15, minutes=3, precision="fp32")
    assert on is False and "3-minute budget" in reason and "fp32" in reason
    assert compile_decision("auto", cpu, 1e15, minutes=10, precision="fp32")[0] is None
    assert compile_decision("auto", cpu, 1e15, precision="fp32")[0] is None
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes").validate()


@pytest.mark.parametrize("eager_s, compiled_s, run_s, compile_s, on", [
    (0.10, 0.07, 600, 30, True),  # 30 % faster over 10 minutes: 180 s saved for 30 s of compiling
    (0.10, 0.07, 60, 30, False),  # ... over one minute: 18 s saved, not worth 30 s
    (0.10, 0.07, 60, 0, True),  # the probe already compiled: any real gain counts
    (0.10, 0.098, 10**6, 0, False),  # 2 % is within noise
    (0.10, 0.12, 10**6, 0, False),  # slower
])
def test_a_measured_probe_decides(eager_s, compiled_s, run_s, compile_s, on):
    decided, reason = compile_pays(CompileProbe(eager_s, compiled_s, compile_s), run_s, compile_s)
    assert decided is on and f"eager {1000 * eager_s:.0f} ms, compiled {1000 * compiled_s:.0f} ms" in reason


def test_auto_probes_once_per_config_and_machine_and_reuses_the_numbers(tmp_path, monkeypatch):
    """A faked probe: its numbers decide, the probe file keeps them, a second run of the same
    config reads them instead of probing, and another config (batch size) is probed again."""
    probes = []

    def fake_probe(loss, try_step, device, probe_file, key, run_s):
        probes.append(json.loads(key)["batch_size"])
        probe = CompileProbe(eager_s=0.2, compiled_s=0.3, compile_s=25.0)  # compiled is slower here
        speed.save_probe(probe_file, key, probe)
        return loss, False, speed.compile_pays(probe, run_s(probe.eager_s), 0.0)[1], None

    monkeypatch.setattr(speed, "probe_compile", fake_probe)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)  # a C++ compiler, as far as auto knows
    file = tmp_path / "cache" / "compile_probe.json"

    def warmed(batch_size):
        tc = quick_train_config(compile="auto", minutes=10, batch_size=batch_size)
        data = {"train": np.zeros(500, np.uint16), "val": np.zeros(500, np.uint16)}
        trainer = Trainer(GPT(tiny_config()), data, torch.ones(512), tc, tmp_path / "ckpt", tmp_path / "m.jsonl",
                          new_run(["b"], tc), probe_file=file)
        trainer.stepper.decide_compile(trainer.tc, trainer.step)
        return trainer.stepper

    first = warmed(8)
    assert probes == [8] and not first.compiled and "eager 200 ms, compiled 300 ms" in first.compile_reason
    again = warmed(8)
    assert probes == [8] and not again.compiled and "eager 200 ms, compiled 300 ms" in again.compile_reason
    warmed(4)
    assert probes == [8, 4]
    assert len(json.loads(file.read_text())) == 2
    file.write_text("{damaged")  # a damaged file is as good as none: probe again
    warmed(8)
    assert probes == [8, 4, 8]


def test_a_failing_compiler_falls_back_to_eager_training_with_a_warning(store, book, monkeypatch):
    def broken_compile(model, **kwargs):
        def forward(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return forward
    monkeypatch.setattr(torch, "compile", broken_compile)
    store.create_model("m", tiny_config())
    events = []
    summary = train(store, "m", [book], quick_train_config(steps=3, compile="on"), on_event=events.append)
    assert summary["status"] == "done" and summary["step"] == 3
    assert events[0]["type"] == "start" and events[0]["compiled"] is False
    assert events[0]["compile_reason"] == "torch.compile failed"
    assert "no C++ compiler found" in events[1]["message"]


def test_selfplay_ab_runs_both_arms_on_a_book_file(tmp_path):
    """python -m bench selfplay end to end on the example book, in seconds: both arms train and are scored."""
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, "-m", "bench", "selfplay", "--book", "books/example_book.txt", "--minutes", "0.04",
                        "--start", "0.4", "--prompts", "2", "--gen_tokens", "12", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    arms = json.loads(out.read_text())["seeds"][0]["arms"]
    assert set(arms) == {"supervised", "selfplay"}
    assert arms["selfplay"]["selfplay_steps"] > 0 and arms["supervised"]["selfplay_steps"] == 0
    assert arms["supervised"]["val_bpb"] > 0 and 0 <= arms["selfplay"]["greedy_loop_rate"] <= 1


def test_probing_and_compiling_count_against_a_minutes_budget(tmp_path, monkeypatch):
    """A probe that takes 11 minutes of a 10-minute budget (a faked clock) leaves time for one step."""
    clock = [1000.0]

    def now():  # 10 ms per reading
        clock[0] += 0.01
        return clock[0]

    monkeypatch.setattr(time, "time", now)

    def slow_probe(loss, try_step, device, probe_file, key, run_s):
        clock[0] += 11 * 60
        return loss, False, "measured: slowly", None

    monkeypatch.setattr(speed, "probe_compile", slow_probe)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    tc = quick_train_config(compile="auto", minutes=10, steps=1000)
    data = {"train": np.zeros(500, np.uint16), "val": np.zeros(500, np.uint16)}
    trainer = Trainer(GPT(tiny_config()), data, torch.ones(512), tc, tmp_path / "ckpt", tmp_path / "m.jsonl",
                      new_run(["b"], tc))
    assert trainer.run()["step"] == 1


def test_the_selfplay_profile_times_a_step_by_its_parts(store, book, capsys):
    """`python -m bench profile`'s self-play rows: a step's roll out and update, beside a supervised step."""
    from bench.profile import profile_selfplay
    ms = profile_selfplay(store, "tiny", tiny_config(), "fp32", torch.device("cpu"), warm=2, steps=3)
    assert all(0 < ms[part] < ms["self-play"] for part in ("roll out", "update"))  # each part lies inside its step
    assert ms["the rest (proposer, bookkeeping)"] >= 0
    out = capsys.readouterr().out
    assert "self-play step tiny fp32: 16 rollouts" in out and "supervised steps: roll out" in out
