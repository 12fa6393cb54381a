"""The transformer and its engine: shapes, causality, the KV cache and decoding copy, sampling
filters, streaming, configs, the chunked loss."""

import pytest
import torch

import generate as G
import model as M
import sizing
from conftest import tiny_config
from generate import KVCache, SamplingConfig, filter_logits
from model import GPT, ModelConfig
from sizing import param_count
from speed import HeadLoss, TrainLoss


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def test_forward_shapes_and_loss(gpt):
    idx = torch.randint(0, 512, (3, 17))
    logits, loss = gpt(idx)
    assert logits.shape == (3, 17, 512) and loss is None
    logits, loss = gpt(idx, idx)  # one return shape, training or not
    assert logits.shape == (3, 17, 512) and loss.shape == () and loss.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_has_the_loss_and_gradients_of_plain_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(HeadLoss, "CHUNK", 7)  # several chunks, the last one short
    torch.manual_seed(0)
    gpt = GPT(tiny_config())
    idx, targets = torch.randint(0, 512, (2, 3, 20))
    targets[0, :4] = -1  # skipped positions

    def loss_and_grads(use_head_loss):
        gpt.zero_grad()
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            loss = TrainLoss(gpt)(idx, targets) if use_head_loss else gpt(idx, targets)[1]
        (3 * loss).backward()  # an outer factor, as grad accumulation or GradScaler apply
        return loss, [p.grad.clone() for p in gpt.parameters()]

    ref, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) < tol
    for a, b in zip(ref_grads, grads):
        assert (a - b).abs().max() <= tol * a.abs().max()


def test_initial_loss_is_near_uniform(gpt):
    idx, targets = torch.randint(0, 512, (2, 4, 32))
    _, loss = gpt(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.3  # small init: ~uniform guess


def test_param_count_matches_the_module():
    for cfg in [tiny_config(), M.PRESETS["small"]]:
        assert param_count(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


def test_head_is_tied_to_the_embedding(gpt):
    assert gpt.lm_head.weight.data_ptr() == gpt.transformer.wte.weight.data_ptr()


def test_future_tokens_do_not_change_past_logits(gpt):
    idx = torch.randint(0, 512, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 512
    a, _ = gpt(idx)
    b, _ = gpt(changed)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_explicit_attention_equals_the_fused_kernel(gpt):
    idx = torch.randint(0, 512, (2, 16))
    fused, _ = gpt(idx)
    for m in gpt.modules():
        if isinstance(m, M.CausalSelfAttention):
            m.fused = False
    explicit, _ = gpt(idx)
    assert torch.allclose(fused, explicit, atol=1e-5)
    atts = gpt.attention_maps(idx)
    assert len(atts) == 2 and atts[0].shape == (2, 2, 16, 16)
    assert torch.allclose(atts[0].sum(-1), torch.ones(2, 2, 16), atol=1e-5)  # rows are distributions
    assert atts[0][0, 0].triu(1).abs().max() == 0  # nothing attends to the future


@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_gives_the_same_logits_as_the_full_forward(gpt, fused):
    for m in gpt.modules():
        if isinstance(m, M.CausalSelfAttention):
            m.fused = fused
    idx = torch.randint(0, 512, (2, 24))
    full, _ = gpt(idx)
    cache = KVCache(gpt.config, 2, "cpu")
    parts = [gpt(idx[:, :10], cache=cache)[0], gpt(idx[:, 10:15], cache=cache)[0]]  # prefill, then a chunk
    parts += [gpt(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 24)]  # then one token at a time
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)


@pytest.fixture
def rough():
    """Weights far from the small init, so that every op leaves a visible mark on the logits."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config()).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt


def test_the_decoding_copy_computes_the_forward(rough):
    """Repacked weights give the model's own logits, for a prefill and then one token at a time."""
    gpt = rough
    idx = torch.randint(0, 512, (2, 12))
    full, _ = gpt(idx)
    fast = G.decoding_copy(gpt, torch.float32)
    cache = KVCache(gpt.config, 2, "cpu")
    steps = [fast(idx[:, :8], cache=cache)[0]] + [fast(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-4, rtol=1e-4)
    assert fast.transformer.wte.weight is gpt.transformer.wte.weight  # shared, not copied
    assert not gpt.transformer.h[0].mlp.c_fc.weight.is_contiguous() is fast.transformer.h[0].mlp.c_fc.weight.is_contiguous()


def test_the_decoding_steps_give_the_plain_forwards_logits_to_1e_5():
    """The fast path as generate_ids runs it (decoding copy, KV cache, one token at a time, under
    inference_mode, dropout left out) against the model's own forward over the whole text."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config(dropout=0.1)).eval()
    idx = torch.randint(0, 512, (1, 20))
    full, _ = gpt(idx)
    fast = G.decoding_copy(gpt, torch.float32)
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    with torch.inference_mode():
        cache = KVCache(gpt.config, 1, "cpu")
        steps = [fast(idx[:, :5], cache=cache)[0]] + [fast(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    assert (full - torch.cat(steps, 1)).abs().max() < 1e-5


def test_the_decoding_copy_follows_a_change_to_the_model(rough, monkeypatch):
    """Decoding runs the model's own forward: change the MLP and the decoding copy changes with it."""
    idx = torch.randint(0, 512, (1, 6))
    gelu = G.decoding_copy(rough, torch.float32)(idx)[0]
    monkeypatch.setattr(M.MLP, "forward", lambda self, x: self.c_proj(torch.relu(self.c_fc(x))))  # GELU -> ReLU
    relu = G.decoding_copy(rough, torch.float32)(idx)[0]
    assert torch.allclose(relu, rough(idx)[0], atol=1e-4) and not torch.allclose(relu, gelu, atol=1e-2)


def test_decoding_in_bf16_matches_the_autocast_forward(rough):
    gpt = rough
    idx = torch.randint(0, 512, (1, 12))
    with torch.autocast("cpu", torch.bfloat16):
        ref, _ = gpt(idx)
    fast = G.decoding_copy(gpt, torch.bfloat16)
    assert fast.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        out, _ = fast(idx)
    assert torch.allclose(ref.float(), out.float(), atol=2e-2)


def test_generation_with_lora_layers_is_unchanged_while_B_is_zero(gpt):
    from lora import LoRAConfig, apply_lora
    idx = torch.randint(0, 512, (1, 5))
    before = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(8, temperature=0))]
    apply_lora(gpt, LoRAConfig())  # B = 0: the same function, in modules the decoding copy leaves as they are
    assert [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(8, temperature=0))] == before


def test_rollouts_are_greedy_continuations_in_one_batch(gpt):
    prompts = torch.randint(0, 512, (3, 6))
    out = G.rollouts(gpt, prompts, 7)
    for row, prompt in zip(out, prompts):
        alone = [t for t, _ in G.generate_ids(gpt, prompt[None], SamplingConfig(7, temperature=0))]
        assert row.tolist() == alone


def test_sequence_longer_than_context_is_a_clear_error(gpt):
    with pytest.raises(ValueError, match="max_seq_len"):
        gpt(torch.zeros(1, 33, dtype=torch.long))


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.randn(2, 100)
    kept = torch.isfinite(filter_logits(logits, top_k=5))
    assert kept.sum(-1).tolist() == [5, 5]
    assert kept[0, logits[0].argmax()]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.75
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 2.0]])
    out = filter_logits(logits, repetition_penalty=2.0, seen=torch.tensor([[0, 1]]))
    assert out.tolist() == [[1.0, -2.0, 2.0]]


def test_temperature_zero_is_greedy_and_seeds_repeat(gpt):
    idx = torch.randint(0, 512, (1, 5))
    greedy = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(10, temperature=0))]
    again = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(10, temperature=0))]
    assert greedy == again
    a = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(30, temperature=1.5, top_k=0, top_p=1, seed=3))]
    b = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(30, temperature=1.5, top_k=0, top_p=1, seed=3))]
    c = [t for t, _ in G.generate_ids(gpt, idx, SamplingConfig(30, temperature=1.5, top_k=0, top_p=1, seed=4))]
    assert a == b and a != c


def test_generation_runs_past_the_context_window(gpt):
    toks = list(G.generate_ids(gpt, torch.zeros(1, 30, dtype=torch.long), SamplingConfig(50, seed=0)))
    assert len(toks) == 50


def test_generation_stops_at_eos(gpt):
    first = next(G.generate_ids(gpt, torch.zeros(1, 3, dtype=torch.long), SamplingConfig(5, temperature=0)))[0]
    toks = list(G.generate_ids(gpt, torch.zeros(1, 3, dtype=torch.long), SamplingConfig(5, temperature=0), eos_id=first))
    assert [t for t, _ in toks] == [first]


def test_generation_draws_only_ids_the_tokenizer_has(gpt):
    # a BPE that stopped merging early: 300 tokens for a model whose vocab_size is 512
    sc = SamplingConfig(200, temperature=5.0, top_k=0, top_p=1.0, seed=0)
    drawn = list(G.generate_ids(gpt, torch.zeros(1, 3, dtype=torch.long), sc, n_tokens=300))
    assert max(t for t, _ in drawn) < 300 and drawn[0][1].shape == (300,)


class ByteTokenizer:
    """One token per byte, so every multi-byte character is split across tokens."""
    eot_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())

    def token_bytes(self, i):
        return bytes([i])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_stream_never_emits_half_a_character(gpt, monkeypatch):
    text = "Żółw и ёж 😀!"
    ids = list(text.encode())
    monkeypatch.setattr(G, "generate_ids", lambda *a, **k: ((t, torch.full((257,), 1 / 257)) for t in ids))
    pieces = [text for text, _, _ in G.stream(gpt, ByteTokenizer(), "x", SamplingConfig(len(ids)))]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces  # bytes of a split character were held back, not emitted broken


def test_stop_string_cuts_the_text(gpt, monkeypatch):
    ids = list("one. two. three.".encode())
    monkeypatch.setattr(G, "generate_ids", lambda *a, **k: ((t, torch.full((257,), 1 / 257)) for t in ids))
    assert G.generate(gpt, ByteTokenizer(), "x", SamplingConfig(100, stop="two")) == "one. "


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=130, num_heads=4), "divisible by num_heads"),
    (dict(d_model=-5), "d_model must be between"),
    (dict(d_model=10**9), "d_model must be between"),
    (dict(num_layers=0), "num_layers must be between"),
    (dict(vocab_size=100), "vocab_size must be between"),
    (dict(dropout=1.5), "dropout"),
    (dict(d_ff=2.5), "whole number"),
])
def test_bad_configs_say_what_to_change(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes).validate()


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "n_embd": 3})


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-3), dict(max_new_tokens=0),
                                 dict(repetition_penalty=100), dict(seed=2**63), dict(top_k=2.5)])
def test_absurd_sampling_values_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad).validate()


def test_memory_estimate_grows_with_batch():
    small, big = sizing.memory_estimate(M.PRESETS["small"], 8), sizing.memory_estimate(M.PRESETS["small"], 32)
    assert small["weights"] == 4 * param_count(M.PRESETS["small"])
    assert big["activations"] > small["activations"] and big["weights"] == small["weights"]


def test_sampling_draws_each_token_with_its_filtered_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])  # top_k=3 removes the last two
    logits = probs.clamp_min(1e-9).log().expand(40_000, 5)
    sc = SamplingConfig(temperature=1.0, top_k=3, top_p=1.0)
    draws = G.sample_next(logits, sc, generator=torch.Generator().manual_seed(0))  # (40000, 1)
    freq = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0, 0]) / 0.95, atol=0.01)


def test_a_tiny_top_p_still_keeps_the_likeliest_token():
    logits = torch.randn(2, 50)
    kept = torch.isfinite(filter_logits(logits, top_p=1e-300))
    assert kept.sum(-1).tolist() == [1, 1] and kept[torch.arange(2), logits.argmax(-1)].all()
    draws = G.sample_next(logits, SamplingConfig(top_p=1e-300, top_k=0), generator=torch.Generator().manual_seed(0))
    assert draws[:, 0].tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_k, top_p, penalty", [(50, 0.95, 1.0), (5, 1.0, 1.0), (0, 0.9, 1.0), (0, 1.0, 1.3), (300, 0.5, 1.0)])
def test_sampling_from_the_candidates_draws_what_the_whole_distribution_draws(top_k, top_p, penalty):
    """The same seed gives the same token as inverse-CDF sampling over all V filtered probabilities."""
    logits, seen = torch.randn(64, 300) * 3, torch.randint(0, 300, (64, 10))
    sc = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    drawn = G.sample_next(logits, sc, seen, generator=torch.Generator().manual_seed(0))
    cdf = filter_logits(logits, 0.8, top_k, top_p, penalty, seen).softmax(-1).cumsum(-1)  # (64, V)
    u = (1 - torch.rand(64, 1, generator=torch.Generator().manual_seed(0))) * cdf[:, -1:]
    assert drawn.tolist() == torch.searchsorted(cdf, u).tolist()
