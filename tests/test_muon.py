"""Muon: its update is orthogonal, it trains, its state checkpoints and resumes exactly."""

import copy

import pytest
import torch

from azr_trainer import TrainConfig
from conftest import quick_train_config, tiny_config
from files import load_tensors
from model import GPT
from muon import Muon, make_optimizer, orthogonalise
from app.runs import resume, train


def test_newton_schulz_sets_every_singular_value_near_one():
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 256), (256, 64), (3, 32, 96)]:  # wide, tall, a stack of three blocks
        G = torch.randn(*shape, generator=g) * torch.linspace(0.1, 10, shape[-1])  # unequal columns
        s_in, s = torch.linalg.svdvals(G), torch.linalg.svdvals(orthogonalise(G))
        assert float(s_in.max() / s_in.min()) > 3  # the input is far from orthogonal
        assert 0.65 < float(s.min()) and float(s.max()) < 1.2, shape


def test_the_update_keeps_the_gradients_singular_vectors():
    """orthogonalise(U S V^T) = U p(S) V^T: in the gradient's own bases it is diagonal."""
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ orthogonalise(G) @ Vh.T  # (48, 48)
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.norm() < 1e-3 * D.norm()


def test_a_toy_regression_learns_with_muon():
    """y = x W*: a matrix with Muon, a bias with the AdamW half of the same optimizer."""
    g = torch.Generator().manual_seed(2)
    W_true, x = torch.randn(16, 32, generator=g), torch.randn(256, 32, generator=g)
    y = x @ W_true.T + 1.0
    W, b = torch.nn.Parameter(torch.zeros(16, 32)), torch.nn.Parameter(torch.zeros(16))
    opt = Muon([dict(params=[W], muon=True, lr=0.05), dict(params=[b], lr=0.05)])
    losses = []
    for _ in range(200):
        loss = ((x @ W.T + b - y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.01 * losses[0]


def test_the_adamw_half_matches_torchs_adamw():
    g = torch.Generator().manual_seed(3)
    ours, theirs = torch.nn.Parameter(torch.randn(10, generator=g)), None
    theirs = torch.nn.Parameter(ours.detach().clone())
    opts = [Muon([dict(params=[ours], lr=1e-2, weight_decay=0.1)], betas=(0.9, 0.95)),
            torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)]
    for _ in range(5):
        grad = torch.randn(10, generator=g)
        for p, opt in zip((ours, theirs), opts):
            p.grad = grad.clone()
            opt.step()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(tiny_config())
    opt = make_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=1e-3))
    names = {p: k for k, p in model.named_parameters()}
    by_group = [(g["muon"], g["blocks"], g["peak_lr"], sorted(names[p].rsplit(".", 2)[-2] for p in g["params"]))
                for g in opt.param_groups]
    assert by_group[0][:3] == (True, 3, 0.02) and set(by_group[0][3]) == {"c_attn"}  # q, k, v apart
    assert by_group[1][:3] == (True, 1, 0.02) and set(by_group[1][3]) == {"c_proj", "c_fc"}
    assert by_group[2][:3] == (False, 1, 1e-3) and by_group[2][3] == ["wpe", "wte"]  # wte is also the head
    assert all(p.dim() == 1 for p in opt.param_groups[3]["params"])


def test_muon_state_saves_and_loads():
    model = GPT(tiny_config())
    tc = TrainConfig(optimizer="muon")
    x = torch.randint(512, (2, 9))

    def step(m, opt):
        m(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()

    opt = make_optimizer(model, tc)
    step(model, opt)
    twin = GPT(tiny_config())
    twin.load_state_dict(model.state_dict())
    twin_opt = make_optimizer(twin, tc)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy, as if read from a file
    assert "momentum_buffer" in twin_opt.state[twin.transformer.h[0].attn.c_attn.weight]
    step(model, opt)
    step(twin, twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_stop_and_resume_with_muon_reproduce_the_uninterrupted_run(store, book, schedule):
    tc = quick_train_config(steps=16, checkpoint_every=4, optimizer="muon", schedule=schedule)
    for name in ("straight", "stopped"):
        store.create_model(name, tiny_config(dropout=0.1))
    train(store, "straight", [book], tc)
    train(store, "stopped", [book], tc, should_stop=lambda: len(store.metrics("stopped")) >= 7)
    saved, _ = load_tensors(sorted(store.checkpoint_dir("stopped").glob("step_*.safetensors"))[-1])
    assert any(k.endswith(".momentum_buffer") for k in saved)  # Muon's state is in the checkpoint
    resume(store, "stopped")
    rows = {n: {r["step"]: r["loss"] for r in store.metrics(n)} for n in ("straight", "stopped")}
    assert rows["stopped"] == rows["straight"] and len(rows["straight"]) == 16  # bit for bit
