"""NF4 (quant.py): the codebook, 4-bit packing, block-wise quantization error, NF4 layers."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config

from model import GPT
from quant import (NF4, NF4Linear, dequantize_absmax, dequantize_nf4, nf4_report, pack_4bit, quantization_error,
                   quantize_absmax, quantize_model, quantize_nf4, tensor_bytes, unpack_4bit)

# the NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table)
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_codebook_matches_published_values():
    assert NF4.shape == (16,)
    assert torch.allclose(NF4, torch.tensor(PUBLISHED_NF4), atol=1e-6)
    assert NF4[7].item() == 0.0  # an exact zero
    assert (NF4[1:] > NF4[:-1]).all()


def test_pack_4bit_round_trip():
    assert pack_4bit(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]  # first code in the high nibble
    codes = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(0))
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 501  # two codes per byte
    assert torch.equal(unpack_4bit(packed)[:1001], codes.to(torch.uint8))


def test_quantize_dequantize_error_is_bounded():
    w = torch.randn(256, 320, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(w)
    wq = dequantize_nf4(q, w.shape)
    # each weight lands on the nearest level of its block: at most half the widest gap between
    # two levels (0.72 -> 1.0) times the block's absmax away (+ a little for the int8 absmax)
    blocks, errors = w.reshape(-1, 64), (wq - w).reshape(-1, 64)
    half_gap = (NF4[1:] - NF4[:-1]).max() / 2
    assert (errors.abs() <= half_gap * blocks.abs().amax(1, keepdim=True) * 1.01).all()
    err = quantization_error(w, q)
    assert err["rel_frobenius"] < 0.1 and err["rmse"] < 0.002  # measured: 0.092, 0.00184
    assert 8 * tensor_bytes(q.values()) / w.numel() <= 4.13


def test_nf4_reproduces_zeros_and_levels_exactly():
    w = torch.zeros(3, 64)
    w[1] = NF4.repeat(4) * 0.5  # a block whose values are exactly levels * absmax
    wq = dequantize_nf4(quantize_nf4(w, double_quant=False), w.shape)
    assert torch.equal(wq[0], w[0])
    assert torch.allclose(wq[1], w[1], atol=1e-7)


def test_double_quantized_absmax_is_close():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.03
    q = quantize_absmax(absmax)
    assert q["absmax_q"].dtype == torch.int8 and q["absmax_scale"].numel() == 4  # ceil(1000 / 256)
    step = q["absmax_scale"].max()  # one int8 step
    assert (dequantize_absmax(q) - absmax).abs().max() <= step / 2 + 1e-7


def test_nf4_linear_matches_linear_within_quantization_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    nf4 = NF4Linear(lin)
    x = torch.randn(2, 5, 64)
    y, yq = lin(x), nf4(x)
    assert yq.shape == (2, 5, 48)
    assert (yq - y).norm() / y.norm() < 0.1
    assert not list(p for p in nf4.parameters() if p.requires_grad)  # frozen
    assert nf4.codes.dtype == torch.uint8 and nf4.codes.numel() == 64 * 48 // 2
    bf16 = NF4Linear(lin, compute_dtype=torch.bfloat16)
    assert bf16.dequantized_weight().dtype == torch.bfloat16
    assert bf16(x).dtype == torch.float32  # the residual stream keeps its dtype


def test_quantize_model_keeps_embeddings_layernorms_and_tied_head():
    torch.manual_seed(0)
    fp = GPT(tiny_config())
    q = quantize_model(copy.deepcopy(fp))
    assert isinstance(q.transformer.h[0].attn.c_attn, NF4Linear)
    assert isinstance(q.transformer.h[1].mlp.c_proj, NF4Linear)
    assert isinstance(q.transformer.wte, nn.Embedding) and isinstance(q.transformer.ln_f, nn.LayerNorm)
    assert isinstance(q.lm_head, nn.Linear) and q.lm_head.weight is q.transformer.wte.weight
    report = nf4_report(fp, q)
    assert report["quantized_layers"] == 8  # 4 linear layers per block, 2 blocks
    assert report["bits_per_param"] < 4.2  # small layers pay a little more for their fp32 scales
    assert report["bytes_after"] < report["bytes_before"]
    assert report["rel_frobenius"] < 0.1
    idx = torch.randint(0, 512, (2, 16))
    logits_fp, logits_q = fp(idx)[0], q(idx)[0]
    assert (logits_q - logits_fp).norm() / logits_fp.norm() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_nf4_linear_on_gpu_matches_cpu():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(4, 128)
    cpu = NF4Linear(lin)(x)
    gpu = NF4Linear(lin.cuda())(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)
