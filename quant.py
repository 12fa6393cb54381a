"""NF4: storing a trained weight matrix in 4 bits per number, as QLoRA does.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3) keeps the
frozen base model in 4 bits and trains LoRA adapters (lora.py) on top. Three ideas:

1. **NormalFloat4.** Trained weights are roughly normal, so the 16 levels of a 4-bit code should
   sit where normal data is dense: at quantiles of N(0, 1), rescaled to [-1, 1]. Each level then
   gets about the same share of the weights, which is what makes a code "information-theoretically
   optimal" for normal data. One level is an exact 0 (padding and zeroed weights stay 0).
2. **Block-wise absmax.** Cut the weights into blocks of 64, divide each block by its largest
   |w| (its absmax) so it fits [-1, 1], and store each number as the index of the nearest level.
   An outlier only stretches the scale of its own 64 numbers, not the whole matrix.
3. **Double quantization.** One fp32 absmax per 64 weights costs 32/64 = 0.5 extra bits per
   weight. Quantizing the absmax values themselves to 8 bits (blocks of 256, one fp32 scale each)
   brings that to 8/64 + 32/(64*256) = 0.127 bits: about 4.127 bits per weight in all.

`NF4Linear` holds a frozen nn.Linear in this form and rebuilds ("dequantizes") the weight in the
compute dtype on every forward pass: memory is paid in 4 bits, the matmul still runs in bf16/fp32.
"""

import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCK = 64  # weights per absmax scale (QLoRA §3)
ABSMAX_BLOCK = 256  # absmax values per second-level scale (double quantization)


# ----------------------------------------------------------------------------- the codebook


def nf4_codebook():
    """The 16 NF4 levels, sorted, in [-1, 1], with an exact 0: 7 negative, 0, 8 positive.

    A symmetric 16-level code has no zero (levels come in +/- pairs), so QLoRA splits the
    codes unevenly: 8 quantiles for the positive half and 7 for the negative half, plus 0.
    On each half the levels sit at equally spaced probabilities between 0.5 (the median, 0)
    and `offset`; they cannot go up to probability 1 because the normal quantile there is
    infinite. The reference implementation (bitsandbytes `create_normal_map`) uses
    offset = 1 - (1/30 + 1/32)/2 = 0.96771. Dividing by the largest level maps the code onto
    [-1, 1], the range of a block after absmax scaling.
    """
    quantile = statistics.NormalDist().inv_cdf  # Q(p): the x with P(X <= x) = p for X ~ N(0, 1)
    offset = 1 - (1 / 30 + 1 / 32) / 2
    positive = [quantile(offset + (0.5 - offset) * i / 8) for i in range(8)]  # from Q(offset) down
    negative = [-quantile(offset + (0.5 - offset) * i / 7) for i in range(7)]
    levels = sorted(negative + [0.0] + positive)
    return torch.tensor(levels, dtype=torch.float64).div(max(levels)).float()


NF4 = nf4_codebook()  # (16,)


# ----------------------------------------------------------------------------- quantize / dequantize


def quantize_nf4(w, double_quant=True):
    """Any float tensor -> dict of the tensors that store it in NF4 (see dequantize_nf4).

    codes   uint8 (n/2,)  two 4-bit level indices per byte
    absmax  the per-64-block scales: fp32 (n_blocks,), or with double quantization
            int8 (n_blocks,) + fp32 scale per 256 blocks + one fp32 mean
    """
    normed, absmax = absmax_blocks(w)
    # nearest level = how many midpoints between neighbouring levels lie below the value
    midpoints = (NF4[1:] + NF4[:-1]).to(w.device) / 2  # (15,)
    codes = torch.bucketize(normed, midpoints)  # (n_blocks, 64) in 0..15
    q = {"codes": pack_4bit(codes.reshape(-1))}
    if double_quant:
        q.update(quantize_absmax(absmax))
    else:
        q["absmax"] = absmax
    return q


def absmax_blocks(w):
    """Any float tensor -> its blocks of 64 scaled into [-1, 1] (n_blocks, 64), and the scales:
    each block's largest |w| (n_blocks,). The last block is zero-padded."""
    blocks = _blocks(w.detach().float().reshape(-1), NF4_BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    return blocks / torch.where(absmax > 0, absmax, 1.0)[:, None], absmax


def dequantize_nf4(q, shape, dtype=torch.float32):
    """The inverse of quantize_nf4, up to rounding: -> tensor of `shape` in `dtype`."""
    absmax = dequantize_absmax(q) if "absmax_q" in q else q["absmax"]  # (n_blocks,)
    codes = unpack_4bit(q["codes"]).reshape(-1, NF4_BLOCK).long()  # (n_blocks, 64)
    w = NF4.to(absmax.device)[codes] * absmax[:, None]  # level * scale: (n_blocks, 64)
    return w.reshape(-1)[: shape.numel()].reshape(shape).to(dtype)


def quantize_absmax(absmax):
    """Double quantization (QLoRA §3): the absmax values, minus their mean, to int8 with one
    fp32 scale per 256 of them. The paper stores them as 8-bit floats; we use a plain linear
    int8 grid of the same 8 bits, which after centring loses almost nothing (`python lora.py
    bench` prints the error with and without double quantization)."""
    mean = absmax.mean()
    blocks = _blocks(absmax - mean, ABSMAX_BLOCK)  # (n_blocks2, 256)
    scale = blocks.abs().amax(dim=1) / 127  # (n_blocks2,)
    absmax_q = torch.round(blocks / torch.where(scale > 0, scale, 1.0)[:, None]).to(torch.int8)
    return {"absmax_q": absmax_q.reshape(-1)[: absmax.numel()], "absmax_scale": scale, "absmax_mean": mean}


def dequantize_absmax(q):
    n = q["absmax_q"].numel()
    blocks = _blocks(q["absmax_q"].float(), ABSMAX_BLOCK)  # (n_blocks2, 256)
    return (blocks * q["absmax_scale"][:, None]).reshape(-1)[:n] + q["absmax_mean"]


def _blocks(flat, size):
    """(n,) -> (ceil(n/size), size), zero-padded at the end."""
    pad = -flat.numel() % size
    return F.pad(flat, (0, pad)).reshape(-1, size)


def pack_4bit(codes):
    """(n,) ints in 0..15 -> (ceil(n/2),) uint8: element 2i in the high nibble, 2i+1 in the low."""
    codes = F.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed):
    """(m,) uint8 -> (2m,) uint8 codes; the inverse of pack_4bit (plus a pad code if n was odd)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


# ----------------------------------------------------------------------------- the layer


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4. The weight is rebuilt in `compute_dtype` each forward.

    The 4-bit tensors are buffers, not parameters: they move with .to(device) and live in the
    state dict, but no optimizer sees them. Autograd keeps the rebuilt weight of each layer
    until the backward pass (bitsandbytes rebuilds it a second time instead, to save that memory).
    """

    def __init__(self, linear, compute_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        for k, v in quantize_nf4(linear.weight).items():
            self.register_buffer(k, v)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized(self):
        return {k: v for k, v in self.named_buffers()}

    def dequantized_weight(self):
        return dequantize_nf4(self.quantized(), torch.Size((self.out_features, self.in_features)), self.compute_dtype)

    def forward(self, x):
        w = self.dequantized_weight()  # (out, in)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, bias).to(x.dtype)  # (B, T, in) -> (B, T, out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


def quantize_model(model, compute_dtype=torch.float32):
    """Replace every nn.Linear of a GPT by an NF4Linear, in place; returns the model.

    Embeddings and LayerNorms stay in full precision (they are small, and a token's embedding
    is read directly, not averaged over a matmul). lm_head stays too: it *is* wte (weight
    tying), so quantizing it would quantize the embedding table behind its back."""
    for name in quantizable(model):
        model.set_submodule(name, NF4Linear(model.get_submodule(name), compute_dtype))
    return model


def quantizable(model):
    """The names of the layers quantize_model replaces: every nn.Linear but lm_head."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


# ----------------------------------------------------------------------------- reports


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model):
    """Bytes of every parameter and buffer; parameters() counts the tied wte/lm_head once."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def quantization_error(w, q):
    """How far dequantize(quantize(w)) is from w: RMSE and ||W - W_q||_F / ||W||_F."""
    err = dequantize_nf4(q, w.shape).float() - w.float()
    return {"rmse": err.pow(2).mean().sqrt().item(), "rel_frobenius": (err.norm() / w.float().norm()).item()}


def nf4_report(fp_model, nf4_model):
    """Bits per parameter of the quantized layers, memory of the whole model before/after, and
    the dequantization error over all quantized weights (fp_model holds the originals)."""
    layers = {n: m for n, m in nf4_model.named_modules() if isinstance(m, NF4Linear)}
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    sq_err = sq_norm = 0.0
    for name, m in layers.items():
        w = fp_model.get_submodule(name).weight.detach().float()
        sq_err += (m.dequantized_weight().float() - w).pow(2).sum().item()
        sq_norm += w.pow(2).sum().item()
    return {
        "quantized_layers": len(layers), "quantized_params": n_weights,
        "bits_per_param": 8 * sum(tensor_bytes(m.buffers()) for m in layers.values()) / n_weights,
        "bytes_before": model_bytes(fp_model), "bytes_after": model_bytes(nf4_model),
        "rmse": (sq_err / n_weights) ** 0.5, "rel_frobenius": (sq_err / sq_norm) ** 0.5,
    }
