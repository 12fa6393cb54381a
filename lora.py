"""LoRA: fine-tune a trained model by learning a small low-rank correction to its weights.

Full fine-tuning updates every weight W (d_out x d_in). LoRA (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", §4.1) freezes W and learns the update as a product of two
thin matrices, B (d_out x r) and A (r x d_in), with r much smaller than d_in and d_out:

    y = W x + (alpha / r) * B A x

Only A and B train: r * (d_in + d_out) numbers instead of d_in * d_out, and AdamW keeps moments
for those alone. B starts at zero, so the wrapped model starts out *identical* to the base; A
starts random so that gradients reach B from the first step (the paper says Gaussian; its
reference code, loralib, uses nn.Linear's Kaiming-uniform, and so do we).
alpha / r keeps the size of the update comparable when r changes; rsLoRA (Kalajdzievski 2023)
argues for alpha / sqrt(r) so that large ranks still learn. Dropout on the LoRA input only.

Because the update is a matrix of W's shape, it can be **merged**: W' = W + (alpha/r) B A is an
ordinary linear layer, so a merged model costs nothing extra at inference. An **adapter** (A and
B of every wrapped layer) is saved apart from the base, a few percent of its size, and records
which exact base weights it was trained on: on another base it would be noise, so it is refused.

QLoRA (Dettmers et al. 2023) is the same thing on top of a base stored in 4-bit NF4 (quant.py):
the base costs ~4.13 bits per weight, the adapter trains in full precision.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import config
from config import setting
from quant import NF4Linear, quantize_model

# the layers of a block LoRA may wrap; "c_proj" means both attn.c_proj and mlp.c_proj.
# lm_head is not offered: it is tied to wte, and merging into it would change the embeddings.
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")


@dataclass
class LoRAConfig:
    r: int = setting(8, "rank of the update B A", 1, 1024)
    alpha: float = setting(16.0, "the update is scaled by alpha / r (the usual choice: 2r)", 1e-3, 10_000)
    dropout: float = setting(0.05, "dropout on the LoRA path's input only", 0.0, 0.9)
    targets: tuple = setting(("c_attn", "c_proj", "c_fc"), "layers to wrap; c_proj means attn.c_proj and mlp.c_proj",
                             choices=TARGETS)
    rslora: bool = setting(False, "scale by alpha / sqrt(r) instead of alpha / r (rsLoRA)")
    nf4: bool = setting(False, "keep the frozen base in 4-bit NF4 (QLoRA)")

    def validate(self):
        """Raise SettingError with a message that says what to change."""
        if isinstance(self.targets, str):  # "c_attn,c_fc" as typed on a command line
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = tuple(self.targets)
        config.validate(self)
        if not self.targets:
            raise config.SettingError(f"targets must name at least one of {', '.join(TARGETS)}", "targets")
        return self

    def to_dict(self):
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d):
        return config.from_dict(cls, d, "LoRA options")


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x), with `base` (nn.Linear or NF4Linear) frozen and
    r, alpha, dropout, rslora from `lc` (a LoRAConfig)."""

    def __init__(self, base, lc, generator=None):
        super().__init__()
        r = lc.r
        self.base = base
        device = (base.codes if isinstance(base, NF4Linear) else base.weight).device  # next to the base weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (d_out, r): B A = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
        self.lora_dropout = nn.Dropout(lc.dropout)
        self.scaling = lc.alpha / math.sqrt(r) if lc.rslora else lc.alpha / r
        self.merged = False

    def forward(self, x):
        y = self.base(x)  # (B, T, d_out)
        if self.merged:  # B A is already inside base.weight
            return y
        h = self.lora_dropout(x) @ self.lora_A.T  # (B, T, d_in) -> (B, T, r): the bottleneck
        return y + (h @ self.lora_B.T) * self.scaling  # (B, T, r) -> (B, T, d_out)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (d_out, r) x (r, d_in) -> (d_out, d_in)

    @torch.no_grad()
    def merge(self):
        """W <- W + scaling * B A: same outputs, one matmul instead of three."""
        if isinstance(self.base, NF4Linear):
            raise ValueError("cannot merge into an NF4 base; load the base in full precision (nf4=False)")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model, lc, generator=None):
    """Freeze every parameter of `model`, then wrap each linear layer whose name ends with one of
    lc.targets (e.g. 'c_proj' or 'attn.c_proj') in a LoRALinear, in place; returns the model.
    For QLoRA call quant.quantize_model first: LoRA then wraps the NF4Linear layers. A starts
    random, drawn from `generator` (default: torch's global RNG)."""
    model.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, NF4Linear)) and name != "lm_head" and _matches(name, lc.targets):
            model.set_submodule(name, LoRALinear(module, lc, generator))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"LoRA targets {list(lc.targets)} match no linear layer of this model")
    return model


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_lora(model, lc, compute_dtype=torch.float32, generator=None):
    """A base GPT -> the model fine-tuning trains: NF4 base first if lc.nf4, then LoRA."""
    if lc.nf4:
        quantize_model(model, compute_dtype)
    return apply_lora(model, lc, generator)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_params(model):
    """{trainable, total, weight_bytes}: total counts an NF4 weight as its d_out*d_in numbers."""
    params = list(model.parameters())  # a tied weight once
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params) + nf4,
            "weight_bytes": sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])}


def merge_lora(model):
    """Fold every adapter into its base weight and drop the LoRA wrappers, in place: the result
    is a plain GPT whose state dict has the base model's names (ready to save as a model)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base)
    return model
