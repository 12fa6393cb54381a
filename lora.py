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

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from model import param_count
from quant import NF4Linear, dequantize_nf4, nf4_report, quantization_error, quantize_model, quantize_nf4, tensor_bytes
from store import StoreError, load_tensors, read_json, save_tensors, write_json

# the layers of a block LoRA may wrap; "c_proj" means both attn.c_proj and mlp.c_proj.
# lm_head is not offered: it is tied to wte, and merging into it would change the embeddings.
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")


@dataclass
class LoRAConfig:
    r: int = 8  # rank of B A
    alpha: float = 16.0  # the update is scaled by alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # on the LoRA path's input only
    targets: tuple = ("c_attn", "c_proj", "c_fc")
    rslora: bool = False
    nf4: bool = False  # keep the frozen base in NF4: QLoRA

    def validate(self):
        """Raise ValueError with a message that says what to change."""
        if isinstance(self.targets, str):  # "c_attn,c_fc" as typed in a form
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = tuple(self.targets)
        checks = [
            (_is_number(self.r) and self.r == int(self.r) and 1 <= self.r <= 1024,
             "lora r must be a whole number between 1 and 1024"),
            (_is_number(self.alpha) and 0 < self.alpha <= 10_000,
             "lora alpha must be in (0, 10000]; the usual choice is 2*r"),
            (_is_number(self.dropout) and 0 <= self.dropout < 1, "lora dropout must be in [0, 1)"),
            (isinstance(self.rslora, bool) and isinstance(self.nf4, bool), "rslora and nf4 must be true or false"),
            (len(self.targets) > 0, f"give at least one LoRA target from {TARGETS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {TARGETS}")
        self.r = int(self.r)
        return self

    def to_dict(self):
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown LoRA options: {sorted(set(d) - known)}")
        return cls(**d).validate()


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x), with `base` (nn.Linear or NF4Linear) frozen."""

    def __init__(self, base, r=8, alpha=16.0, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base
        device = (base.codes if isinstance(base, NF4Linear) else base.weight).device  # next to the base weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (d_out, r): B A = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
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


def apply_lora(model, targets=("c_attn", "c_proj", "c_fc"), r=8, alpha=16.0, dropout=0.0, rslora=False):
    """Freeze every parameter of `model`, then wrap each linear layer whose name ends with one of
    `targets` (e.g. 'c_proj' or 'attn.c_proj') in a LoRALinear, in place; returns the model.
    For QLoRA call quant.quantize_model first: LoRA then wraps the NF4Linear layers."""
    model.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, NF4Linear)) and name != "lm_head" and _matches(name, targets):
            model.set_submodule(name, LoRALinear(module, r, alpha, dropout, rslora))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of this model")
    return model


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_lora(model, lc, compute_dtype=torch.float32):
    """A base GPT -> the model fine-tuning trains: NF4 base first if lc.nf4, then LoRA."""
    if lc.nf4:
        quantize_model(model, compute_dtype)
    return apply_lora(model, lc.targets, lc.r, lc.alpha, lc.dropout, lc.rslora)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_params(model):
    """{trainable, total, weight_bytes}: total counts an NF4 weight as its d_out*d_in numbers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"trainable": trainable, "total": param_count(model.config) + extra, "weight_bytes": weight_bytes}


def merge_lora(model):
    """Fold every adapter into its base weight and drop the LoRA wrappers, in place: the result
    is a plain GPT whose state dict has the base model's names (ready to save as a model)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base)
    return model


# ----------------------------------------------------------------------------- adapters on disk


def lora_state(model):
    """The adapter's tensors: {'transformer.h.0.attn.c_attn.lora_A': (r, d_in), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_state(model, tensors):
    """Copy adapter tensors into a model that has the same LoRA layers (same targets and r)."""
    own = lora_state(model)
    if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
        raise StoreError("the adapter's tensors do not fit this model: different targets, rank or config")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])


def save_adapter(store, name, adapter, model, lc, base_sha256, run=None):
    """models/<name>/adapters/<adapter>/adapter.safetensors + adapter_config.json (written last:
    its presence marks a complete adapter)."""
    d = store.adapter_dir(name, adapter, must_exist=False)
    d.mkdir(parents=True, exist_ok=True)
    save_tensors(d / "adapter.safetensors", lora_state(model), {"base_sha256": base_sha256})
    config = {"name": adapter, "base_model": name, "base_sha256": base_sha256, "lora": lc.to_dict(),
              "params": count_params(model), "run": run, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(d / "adapter_config.json", config)
    return config


def adapter_info(store, name, adapter):
    return read_json(store.adapter_dir(name, adapter) / "adapter_config.json")


def load_adapter(store, name, adapter, device="cpu", nf4=None):
    """The base model `name` with its saved adapter attached, in eval mode.

    nf4=None rebuilds the base as it was during training (NF4 for a QLoRA adapter); False/True
    force a full-precision or NF4 base. Refuses an adapter trained on other base weights."""
    info = adapter_info(store, name, adapter)
    check_base(store, name, info)
    lc = LoRAConfig.from_dict(info["lora"])
    model = attach_lora(store.load_model(name, device), lc if nf4 is None else replace(lc, nf4=nf4))
    tensors, _ = load_tensors(store.adapter_dir(name, adapter) / "adapter.safetensors")
    load_lora_state(model, tensors)
    return model.eval()


def check_base(store, name, info):
    """An adapter is a correction to one exact set of base weights: anything else is refused."""
    if info["base_model"] != name:
        raise StoreError(f"adapter {info['name']!r} was trained on model {info['base_model']!r}, not {name!r}")
    current = store.weights_sha256(name)
    if info["base_sha256"] != current:
        raise StoreError(
            f"adapter {info['name']!r} was trained on other weights of {name!r} (sha256 "
            f"{info['base_sha256'][:12]}, now {current[:12]}): the model was trained further or rolled "
            f"back since. Roll it back to the version the adapter was trained on, or fine-tune again.")


def merge_adapter(store, name, adapter, out):
    """A new model `out` = base `name` with `adapter` merged in; copies the tokenizer, and its
    lineage records parent {model, adapter}.

    A QLoRA adapter is merged into the full-precision base weights W, not into NF4(W): it was
    trained against NF4(W), so the merged model differs from what it learned with by the
    quantization error of W (see quant.nf4_report), but it stays a full-precision model."""
    info = adapter_info(store, name, adapter)
    model = merge_lora(load_adapter(store, name, adapter, nf4=False))
    store.create_model(out, model.config, parent={"model": name, "adapter": adapter},
                       model=model, tokenizer=store.tokenizer(name))
    base, run = store.lineage(name), info.get("run") or {}
    known = {b["sha256"] for b in base["books"]}
    books = base["books"] + [b for b in run.get("books", []) if b["sha256"] not in known]
    return store.update_lineage(out, books=books, steps=base["steps"] + run.get("steps", 0))


# ----------------------------------------------------------------------------- python lora.py bench


def bench_matrix(n=4096, device="cpu"):
    """NF4 on a random N(0, 0.02^2) n x n matrix: bits, bytes, error and speed."""
    w = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    q, quantize_s = _timed(lambda: quantize_nf4(w))
    _, dequantize_s = _timed(lambda: dequantize_nf4(q, w.shape))
    plain = quantize_nf4(w, double_quant=False)
    return {"shape": [n, n], "device": str(device), "bits_per_param": 8 * tensor_bytes(q.values()) / w.numel(),
            "bytes_fp32": tensor_bytes([w]), "bytes_nf4": tensor_bytes(q.values()), **quantization_error(w, q),
            "quantize_s": quantize_s, "dequantize_s": dequantize_s,
            "without_double_quant": {"bits_per_param": 8 * tensor_bytes(plain.values()) / w.numel(),
                                     **quantization_error(w, plain)}}


def bench_finetune(store, base_book, new_book, preset, base_steps, ft_steps, device):
    """Train a base on one book, then fine-tune it on another three ways (QLoRA, LoRA, full),
    with the same steps, batch and learning rate: val bits/byte on the new book, speed, memory."""
    from azr_trainer import TrainConfig, evaluate_bpb, finetune, train
    from model import PRESETS
    from tokenizer import prepare_tokens
    store.create_model("base", PRESETS[preset])
    train(store, "base", [base_book], TrainConfig(steps=base_steps, eval_every=base_steps, device=device))
    tok, fp = store.tokenizer("base"), store.load_model("base", device)
    book, text, _ = store.resolve_book(new_book)
    val = prepare_tokens(tok, {book: text}, store.home / "cache" / "tokens")["val"]
    byte_len = torch.from_numpy(tok.byte_lengths())

    def val_bpb(model):  # the same 128 windows of the new book's validation split every time
        return evaluate_bpb(model, val, byte_len, fp.config.max_seq_len, 128, torch.device(device))["val_bpb"]

    nf4 = quantize_model(copy.deepcopy(fp))
    out = {"base_val_bpb": val_bpb(fp), "base_nf4_val_bpb": val_bpb(nf4), "nf4": nf4_report(fp, nf4)}
    store.create_model("full", fp.config, model=fp, tokenizer=tok)
    tc = TrainConfig(steps=ft_steps, eval_every=ft_steps, warmup_steps=20, device=device)
    for label, lc in (("qlora", LoRAConfig(nf4=True)), ("lora", LoRAConfig()), ("full", None)):
        events = []
        if lc:
            finetune(store, "base", [new_book], tc, label, lc, on_event=events.append)
            model = load_adapter(store, "base", label, device)
        else:
            train(store, "full", [new_book], tc, on_event=events.append)
            model = store.load_model("full", device)
        steps = [e for e in events if e["type"] == "step"][1:]  # the first step pays for warm-up
        step_s = sum(tc.batch_size * fp.config.max_seq_len / e["tokens_per_s"] for e in steps)
        out[label] = {"val_bpb": val_bpb(model), "steps_per_s": len(steps) / step_s,
                      "params": events[0]["params"], "precision": events[0]["precision"]}
    out["qlora"]["merged_val_bpb"] = val_bpb(merge_lora(load_adapter(store, "base", "qlora", device, nf4=False)))
    return out


def _timed(fn):
    """(fn(), seconds): waits for the GPU, whose kernels run asynchronously."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def main(argv=None):
    import argparse
    import tempfile
    from hardware import pick_device
    from store import Store
    books = Path(__file__).resolve().parents[1] / "shared" / "books"
    p = argparse.ArgumentParser(prog="python lora.py", description="NF4 + QLoRA benchmark (BENCHMARKS.md)")
    p.add_argument("command", choices=["bench"])
    p.add_argument("--base-book", default=str(books / "pride_and_prejudice.txt"))
    p.add_argument("--new-book", default=str(books / "tinyshakespeare.txt"))
    p.add_argument("--preset", default="small")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--ft-steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    print(json.dumps({"matrix": bench_matrix(device=device)}, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as home:
        result = bench_finetune(Store(home), args.base_book, args.new_book, args.preset, args.base_steps,
                                args.ft_steps, str(device))
    print(json.dumps({"finetune": result, "args": vars(args), "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    import lora  # the importable module, so that this code and azr_trainer share one LoRALinear class

    lora.main(sys.argv[1:])
