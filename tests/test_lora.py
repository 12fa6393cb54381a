"""LoRA and QLoRA (lora.py): the layer, merging, adapters on disk (app/adapters.py), fine-tuning (app/runs.py), the CLI."""

import copy
import shutil

import pytest
import torch
from conftest import ROOT, quick_train_config, tiny_config

import cli
from files import StoreError, weights_of
from lora import LoRAConfig, LoRALinear, apply_lora, count_params, lora_layers, merge_lora
from model import GPT
from quant import NF4Linear, quantize_model
from app.runs import finetune, resume, train


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(tiny_config()).eval()


def randomize_B(model, seed=1):
    """A freshly wrapped model equals its base (B = 0); give B values so merges have work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def byte_batch(text, B=8, T=32, seed=0):
    """Windows of raw UTF-8 bytes (ids < 256 fit the tiny vocab): no tokenizer needed."""
    ids = torch.tensor(list(text.encode()[:8000]))
    ix = torch.randint(len(ids) - T - 1, (B,), generator=torch.Generator().manual_seed(seed))
    rows = torch.stack([ids[i:i + T + 1] for i in ix])  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def train_steps(model, batches, lr):
    """Plain AdamW steps on the trainable parameters; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


IDX = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- the layer


def test_lora_starts_identical_to_base():
    base = tiny_gpt()
    wrapped = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert torch.equal(wrapped(IDX)[0], base(IDX)[0])


def test_apply_lora_wraps_targets_and_freezes_the_rest():
    model = apply_lora(tiny_gpt(), LoRAConfig(targets=("c_attn", "mlp.c_proj"), r=4, dropout=0.0))
    expected = [f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "mlp.c_proj")]
    assert sorted(lora_layers(model)) == expected
    assert not isinstance(model.transformer.h[0].attn.c_proj, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    counts = count_params(model)
    # per block: c_attn (32 -> 96) and mlp.c_proj (64 -> 32), each r * (d_in + d_out)
    assert counts["trainable"] == 2 * (4 * (32 + 96) + 4 * (64 + 32))
    assert counts["total"] == sum(p.numel() for p in tiny_gpt().parameters()) + counts["trainable"]


def test_lora_scaling_and_rslora():
    lin = torch.nn.Linear(16, 8)
    assert LoRALinear(lin, LoRAConfig(r=4, alpha=16)).scaling == 4.0
    assert LoRALinear(lin, LoRAConfig(r=4, alpha=16, rslora=True)).scaling == 8.0  # alpha / sqrt(r)


def test_lora_forward_is_W_x_plus_scaled_B_A_x():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), LoRAConfig(r=2, alpha=6, dropout=0.0))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    expected = layer.base(x) + 3.0 * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_only_lora_params_change_during_training(book_text):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, dropout=0.1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, [byte_batch(book_text, seed=s) for s in range(3)], lr=1e-2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(weights_of(model, trainable_only=True))  # every A and B moved, nothing else did
    assert all(k.endswith(("lora_A", "lora_B")) for k in changed)


def test_lora_merge_matches_unmerged_output():
    model = randomize_B(apply_lora(tiny_gpt(), LoRAConfig(r=4, alpha=8, dropout=0.0)))
    base_w = model.transformer.h[0].attn.c_attn.base.weight.clone()
    unmerged = model(IDX)[0]
    layer = model.transformer.h[0].attn.c_attn
    layer.merge()
    layer.unmerge()
    assert torch.allclose(layer.base.weight, base_w, atol=1e-6)
    merged = merge_lora(model)
    assert not lora_layers(merged) and isinstance(merged.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert torch.allclose(merged(IDX)[0], unmerged, atol=1e-5)
    assert not torch.allclose(unmerged, tiny_gpt()(IDX)[0], atol=1e-3)  # the adapter did change the outputs


def test_lora_config_rejects_bad_values():
    with pytest.raises(ValueError, match="targets must be any of"):
        LoRAConfig(targets=("c_atn",)).validate()
    with pytest.raises(ValueError, match="r must be between"):
        LoRAConfig(r=0).validate()
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_gpt(), LoRAConfig(targets=("wte",)))


# ----------------------------------------------------------------------------- QLoRA


def test_qlora_forward_backward_reduces_loss(book_text):
    torch.manual_seed(0)
    base = GPT(tiny_config())
    train_steps(base, [byte_batch(book_text, seed=s) for s in range(40)], lr=1e-2)  # a base that knows the text
    model = apply_lora(quantize_model(base), LoRAConfig(dropout=0.0)).train()
    assert isinstance(model.transformer.h[0].mlp.c_fc.base, NF4Linear)
    codes = model.transformer.h[0].mlp.c_fc.base.codes.clone()
    new_text = byte_batch(book_text[20000:].upper())  # capitals: bytes the base has hardly seen
    losses = train_steps(model, [new_text] * 30, lr=1e-2)
    assert losses[-1] < losses[0] - 1.0  # measured: 7.08 -> 4.85
    assert torch.equal(model.transformer.h[0].mlp.c_fc.base.codes, codes)  # the 4-bit base never moves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_qlora_trains_on_gpu():
    torch.manual_seed(0)
    model = apply_lora(quantize_model(GPT(tiny_config()).cuda(), torch.bfloat16), LoRAConfig(r=4, dropout=0.0)).train()
    assert model.transformer.h[0].attn.c_attn.lora_A.device.type == "cuda"  # A and B sit next to the base
    x, y = (t.cuda() for t in byte_batch("a small text, " * 200))
    losses = train_steps(model, [(x, y)] * 5, lr=1e-2)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- adapters on disk


def test_adapter_save_load_round_trip(trained):
    store, name = trained
    lc = LoRAConfig(r=4, alpha=8, targets=("c_attn", "c_fc"))
    model = randomize_B(apply_lora(store.load_model(name), lc).eval())
    store.adapters.save(name, "a", model, lc, store.weights_sha256(name))
    assert store.adapters.list(name) == ["a"]
    assert store.adapters.info(name, "a")["lora"]["targets"] == ["c_attn", "c_fc"]
    loaded = store.adapters.load(name, "a")
    assert torch.equal(loaded(IDX)[0], model(IDX)[0])


def test_adapter_refused_on_a_different_base(trained):
    store, name = trained
    lc = LoRAConfig(r=4)
    model = apply_lora(store.load_model(name), lc)
    store.adapters.save(name, "a", model, lc, store.weights_sha256(name))
    store.create_model("other", tiny_config())  # same shapes, other weights
    (store.model_dir("other") / "adapters").mkdir()
    shutil.copytree(store.adapters.dir(name, "a"), store.model_dir("other") / "adapters" / "a")
    with pytest.raises(StoreError, match="trained on model 'tiny', not 'other'"):
        store.adapters.load("other", "a")
    train(store, name, ["book"], quick_train_config(steps=2))  # the base itself moves on
    with pytest.raises(StoreError, match="trained on other weights"):
        store.adapters.load(name, "a")
    store.rollback(name, "v001")  # back to the weights the adapter knows
    store.adapters.load(name, "a")


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_trains_adapter_and_leaves_base_untouched(trained):
    store, name = trained
    sha, lineage = store.weights_sha256(name), store.lineage(name)
    events = []
    summary = finetune(store, name, ["book"], quick_train_config(steps=6, eval_every=3), "a",
                       LoRAConfig(r=4, nf4=True), on_event=events.append)
    assert summary["status"] == "done" and summary["params"]["trainable"] == events[0]["params"]["trainable"]
    assert 0 < summary["params"]["trainable"] < summary["params"]["total"] / 5
    assert store.weights_sha256(name) == sha and store.lineage(name) == lineage
    info = store.adapters.info(name, "a")
    assert info["base_sha256"] == sha and info["lora"]["nf4"] and info["run"]["steps"] == 6
    state = weights_of(store.adapters.load(name, "a"), trainable_only=True)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_B"))  # B moved away from 0
    with pytest.raises(StoreError, match="already has an adapter"):
        finetune(store, name, ["book"], quick_train_config(steps=2), "a")


def test_finetune_stop_and_resume_matches_uninterrupted_run(trained):
    store, name = trained
    tc = quick_train_config(steps=8, checkpoint_every=4, eval_every=4)
    finetune(store, name, ["book"], tc, "whole", LoRAConfig(r=4, dropout=0.1))
    calls = iter(range(100))
    stopped = finetune(store, name, ["book"], tc, "halves", LoRAConfig(r=4, dropout=0.1),
                       should_stop=lambda: next(calls) >= 5)
    assert stopped["status"] == "stopped" and store.adapters.info(name, "halves")["run"]["status"] == "stopped"
    assert resume(store, name, adapter="halves")["status"] == "done"
    whole, halves = (weights_of(store.adapters.load(name, a), trainable_only=True) for a in ("whole", "halves"))
    assert all(torch.equal(whole[k], halves[k]) for k in whole)


def test_finetune_needs_a_trained_tokenizer(store, book):
    store.create_model("fresh", tiny_config())
    with pytest.raises(StoreError, match="no tokenizer yet"):
        finetune(store, "fresh", [book], quick_train_config(), "a")


# ----------------------------------------------------------------------------- the command line


def test_cli_finetune_generate_merge(trained, capsys):
    store, name = trained
    home = str(store.home)
    book = str(ROOT / "books" / "example_book.txt")
    assert cli.main(["--home", home, "finetune", name, "--book", book, "--adapter", "ft", "--lora-nf4", "--lora-r", "4",
                     "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--precision", "fp32",
                     "--device", "cpu"]) == 0
    assert "trained 3,072 of" in capsys.readouterr().out  # 2 blocks x r=4 x (32+96 + 32+32 + 32+64 + 64+32)
    assert cli.main(["--home", home, "generate", name, "--adapter", "ft", "--prompt", "The", "--max-new-tokens", "5",
                     "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert cli.main(["--home", home, "merge", name, "--adapter", "ft", "--out", "merged"]) == 0
    lineage = store.lineage("merged")
    assert lineage["parent"] == {"model": name, "adapter": "ft"} and lineage["steps"] == 20 + 4
    tokenizer_json = (store.model_dir(name) / "tokenizer.json").read_text()
    assert (store.model_dir("merged") / "tokenizer.json").read_text() == tokenizer_json
    full_precision = store.adapters.load(name, "ft", nf4=False)
    assert torch.allclose(store.load_model("merged").eval()(IDX)[0], full_precision(IDX)[0], atol=1e-5)
    assert cli.main(["--home", home, "merge", name, "--adapter", "ft", "--out", "merged"]) == 2  # name taken
    assert cli.main(["--home", home, "generate", name, "--adapter", "nope"]) == 2
    assert "has no adapter 'nope'" in capsys.readouterr().err
