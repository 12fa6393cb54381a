"""Take the model anywhere: a Hugging Face folder, a GGUF file for llama.cpp, a PEFT adapter.

Our network is GPT-2 (model.py) with GPT-2's parameter names, so each export is a rename and,
here and there, a transpose; nothing is retrained or approximated (f16 and q8_0 round, by choice):

- **Hugging Face** (`save_pretrained` layout): `GPT2LMHeadModel` with `gelu_pytorch_tanh` is
  our forward pass. HF's GPT-2 keeps its block layers as `Conv1D`, which computes x @ W + b with
  W stored (in, out) — nn.Linear's W.T — so those four matrices are transposed; the tied lm_head
  is left out, as HF saves it. Our tokenizer.json is already the `tokenizers` format.
- **GGUF** (llama.cpp, LM Studio, Ollama): one file of metadata (the architecture's sizes, the
  BPE vocabulary and merges) and tensors under llama.cpp's names, taken from the `gguf` package's
  own GPT-2 name table. llama.cpp keeps nn.Linear's (out, in) layout, so nothing is transposed,
  and it reads the output layer from `output.weight`, so the tied head is written out as a copy.
  Beside it, `<name>.Modelfile` makes it an Ollama model: the file, a template that hands Ollama
  the prompt as it is (a book model continues text; it has no chat format), and our sampling
  defaults, since a GGUF holds none.
- **PEFT**: our LoRA's A (r, d_in) and B (d_out, r) are PEFT's `lora_A.weight` and `lora_B.weight`
  under `base_model.model.<module>`; `fan_in_fan_out` tells PEFT that the base layers are Conv1D.

An export is written into a temp folder (or file) beside its target and renamed into place, so
a failed export leaves nothing half-written. It refuses to write into the model store, and it
replaces an existing target only with `force` — and then only an earlier export, never a folder
that holds anything else.

GGUF: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md; PEFT: Mangrulkar et al. 2022.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from config import VERSION
from files import Exists, StoreError, load_tensors, replacing, weights_of, write_json
from generate import SamplingConfig
from lora import LoRAConfig
from tokenizer import EOT

FORMATS = ("hf", "gguf", "peft")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "q8_0": None}  # q8_0: GGUF only
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# what HF's generate() shares with our SamplingConfig, under the same names; seed and stop do not carry over
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
# the same fields under Ollama's PARAMETER names
OLLAMA_NAMES = {"max_new_tokens": "num_predict", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "repetition_penalty": "repeat_penalty"}
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def export(store, name, fmt, out, adapter=None, dtype="f32", force=False):
    """Write model `name` (fmt hf or gguf) or its `adapter` (fmt peft) to `out`; -> out."""
    check_options(fmt, adapter, dtype)
    if store.tokenizer(name) is None:
        raise StoreError(f"model {name!r} has no tokenizer yet: train it on a book before exporting it")
    out = check_target(store, Path(out), fmt, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        with replacing(out) as tmp:
            write_gguf(store, name, tmp, dtype)
            tmp.chmod(0o644)  # temp files are private (0600); an export is for sharing
        with replacing(modelfile_of(out)) as tmp:
            tmp.write_text(modelfile(out.name, store.config(name)), encoding="utf-8")
            tmp.chmod(0o644)
    elif fmt == "hf":
        with new_folder(out) as tmp:
            write_hf(store, name, tmp, dtype)
    else:
        with new_folder(out) as tmp:
            write_peft(store, name, adapter, tmp, dtype)
    return out


def check_options(fmt, adapter, dtype):
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "q8_0" and fmt != "gguf":
        raise ValueError("dtype q8_0 is a GGUF type; export hf and peft as f32 or f16")
    if (fmt == "peft") != bool(adapter):
        raise ValueError("format peft exports an adapter: name it (--adapter)" if fmt == "peft" else
                         f"an adapter exports as format peft, not {fmt}; export its base model as {fmt} alone")


# ----------------------------------------------------------------------------- Hugging Face


def write_hf(store, name, folder, dtype="f32"):
    """A folder that transformers' from_pretrained loads as GPT2LMHeadModel and AutoTokenizer."""
    model, tok = store.load_model(name), store.tokenizer(name)
    save_file(hf_state(model, DTYPES[dtype]), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", hf_config(model, tok.eot_id, dtype))
    shutil.copyfile(store.model_dir(name) / "tokenizer.json", folder / "tokenizer.json")
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False, "add_bos_token": False,
        "model_max_length": model.config.max_seq_len, "clean_up_tokenization_spaces": False})
    write_json(folder / "generation_config.json", generation_config(tok.eot_id))
    (folder / "README.md").write_text(model_card(store, name, model), encoding="utf-8")


def hf_state(model, dtype=torch.float32):
    """Our weights under HF's names (the same) and layout: Conv1D's matrices transposed."""
    return {k: (v.t() if k.endswith(CONV1D) else v).to(dtype).contiguous() for k, v in weights_of(model).items()}


def hf_config(model, eot_id, dtype="f32"):
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len, "activation_function": "gelu_pytorch_tanh",  # GELU's tanh form, like F.gelu(approximate="tanh")
        "layer_norm_epsilon": model.transformer.ln_f.eps, "tie_word_embeddings": True,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": str(DTYPES[dtype]).removeprefix("torch."),
    }


def generation_config(eot_id):
    """generate()'s defaults: our SamplingConfig's. HF's repetition penalty is CTRL's, like ours."""
    sc = SamplingConfig()
    return {"do_sample": sc.temperature > 0, **{f: getattr(sc, f) for f in GENERATION_FIELDS},
            "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}


def model_card(store, name, model):
    """README.md in the Hub's model-card form: YAML front matter, then what the model learned from."""
    info, lin = store.info(name), store.lineage(name)
    books = "\n".join(f"- {b['name']} (sha256 `{b['sha256']}`)" for b in lin["books"]) or "- none yet"
    runs = "\n".join(f"- {r['date']}: {r['steps']} steps, {r['status']}" for r in lin["runs"]) or "- none"
    cfg = ", ".join(f"{k}={v}" for k, v in model.config.to_dict().items())
    bpb = lin["best_val_bpb"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, azr-model-trainer]
# license: choose one before you share this model; the books' licenses may restrict yours
---

# {name}

A GPT-2 model of {info['params']:,} parameters, trained from scratch with AZR Model Trainer {VERSION}
({cfg}). It writes in the style of the books below and knows nothing else.

- Training steps: {lin['steps']}
- Best validation bits/byte: {'-' if bpb is None else bpb}
- Parent: {json.dumps(lin['parent']) if lin['parent'] else 'none (trained from scratch)'}

## Books

{books}

## Runs

{runs}

## Use

```python
from transformers import AutoTokenizer, GPT2LMHeadModel

model = GPT2LMHeadModel.from_pretrained("path/to/this/folder")
tok = AutoTokenizer.from_pretrained("path/to/this/folder")
ids = tok("Once upon a time", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens={model.config.max_seq_len // 2})[0]))
```

The context is {model.config.max_seq_len} tokens: the prompt and the new tokens must fit in it
(AZR Model Trainer's own generator slides a window past it; generate() does not).
"""


# ----------------------------------------------------------------------------- GGUF


GGUF_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def write_gguf(store, name, path, dtype="f32"):
    """One .gguf file for llama.cpp's gpt2 architecture."""
    model, tok = store.load_model(name), store.tokenizer(name)
    cfg = model.config
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)  # llama.cpp stops at the context; it does not slide a window
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_layer_norm_eps(model.transformer.ln_f.eps)
    w.add_file_type(GGUF_FILE_TYPE[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, tok, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.num_layers)
    for key, t in model.state_dict().items():  # lm_head.weight, tied to wte, becomes output.weight
        data, qtype = gguf_tensor(t.float().numpy(), dtype)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_vocab(w, tok, n_vocab):
    """The BPE vocabulary as llama.cpp's "gpt2" tokenizer reads it: the byte-level token strings
    by id, their types, the merges in rank order. Rows of the embedding that BPE training never
    filled (a short book) get unused placeholder tokens: llama.cpp needs one token per row."""
    spec = json.loads(tok.hf.to_str())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if i == tok.eot_id else gguf.TokenType.NORMAL if i in by_id
             else gguf.TokenType.UNUSED for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-split regex: the one HF's ByteLevel(use_regex=True) uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    # byte-level tokens never hold a space (it is shown as "Ġ"), so "a b" is unambiguous
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_add_bos_token(False)  # our prompts start with their own first token


def gguf_tensor(a, dtype):
    """-> (array, its GGML type). Vectors (biases, norms) stay f32, as llama.cpp's kernels want;
    q8_0 (blocks of 32 int8 with one f16 scale) needs rows that are whole blocks, else f16."""
    if a.ndim == 1 or dtype == "f32":
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def modelfile_of(gguf_path):
    """tiny.gguf -> tiny.Modelfile: named after its GGUF, so two exports in one folder never clash."""
    return gguf_path.with_suffix(".Modelfile")


def modelfile(gguf_name, cfg):
    """An Ollama Modelfile for the GGUF `gguf_name` in the same folder (Ollama reads FROM relative
    to the Modelfile). llama.cpp does not slide a window past the context for GPT-2, so the
    context is the model's and a default answer takes at most half of it."""
    sc = SamplingConfig()
    params = {OLLAMA_NAMES[f]: getattr(sc, f) for f in OLLAMA_NAMES}
    params["num_predict"] = min(params["num_predict"], cfg.max_seq_len // 2)
    # our repetition penalty looks at every token in the context, llama.cpp's at the last
    # repeat_last_n: -1 means the whole context
    params.update(num_ctx=cfg.max_seq_len, repeat_last_n=-1)
    lines = [f"# Ollama: ollama create mybook -f {modelfile_of(Path(gguf_name)).name} && ollama run mybook",
             f"# Made by AZR Model Trainer {VERSION}: a book model, it continues the prompt (no chat format).",
             f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""']
    return "\n".join(lines + [f"PARAMETER {k} {v}" for k, v in params.items()]) + "\n"


# ----------------------------------------------------------------------------- PEFT


def write_peft(store, name, adapter, folder, dtype="f32"):
    """A folder that PeftModel.from_pretrained(base, folder) loads on top of the HF export of `name`."""
    info = store.adapters.info(name, adapter)
    store.adapters.check_base(name, info)  # on any other weights than the current ones it would be noise
    lc = LoRAConfig.from_dict(info["lora"])
    tensors, _ = load_tensors(store.adapters.dir(name, adapter) / "adapter.safetensors")
    save_file(peft_state(tensors, DTYPES[dtype]), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", peft_config(lc, name))
    (folder / "README.md").write_text(adapter_card(name, adapter, info), encoding="utf-8")


def peft_state(tensors, dtype=torch.float32):
    """'transformer.h.0.attn.c_attn.lora_A' -> 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'."""
    return {f"base_model.model.{k}.weight": v.to(dtype).contiguous() for k, v in tensors.items()}


def peft_config(lc, base):
    """adapter_config.json: PEFT's LoraConfig. Its target_modules match a module name or its
    ending, the way ours do ("attn.c_proj"); it scales by alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout, "target_modules": list(lc.targets),
            "use_rslora": lc.rslora, "fan_in_fan_out": True, "bias": "none", "inference_mode": True}


def adapter_card(name, adapter, info):
    run = info.get("run") or {}
    books = "\n".join(f"- {b['name']} (sha256 `{b['sha256']}`)" for b in run.get("books", [])) or "- none"
    return f"""---
library_name: peft
base_model: {name}
tags: [lora, gpt2, azr-model-trainer]
# license: choose one before you share this adapter; the books' licenses may restrict yours
---

# {adapter}

A LoRA adapter (r={info['lora']['r']}, alpha={info['lora']['alpha']}, layers {', '.join(info['lora']['targets'])})
trained with AZR Model Trainer {VERSION} on top of model `{name}` — exactly the weights with sha256
`{info['base_sha256']}` (PEFT does not check this: load it on the HF export of those weights).
{'It was trained on an NF4 (4-bit) base; these are its full-precision A and B.' if info['lora'].get('nf4') else ''}

- Steps: {run.get('steps', 0)}; best validation bits/byte: {run.get('best_val_bpb', '-')}

## Books

{books}

## Use

```python
from peft import PeftModel
from transformers import GPT2LMHeadModel

base = GPT2LMHeadModel.from_pretrained("path/to/{name}-hf")  # python cli.py export {name} --format hf ...
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```
"""


# ----------------------------------------------------------------------------- where it goes


def check_target(store, out, fmt, force):
    """The path to write, refused when it lies inside the store or when it exists (unless
    `force`, and then only when it is an earlier export of the same kind)."""
    out = out.expanduser().resolve()
    inside = [d for d in ("models", "checkpoints", "books") if out.is_relative_to(store.home / d)]
    if inside:
        raise StoreError(f"--out {out} is inside the data folder's {inside[0]}/; export somewhere else")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise ValueError(f"a GGUF export is a file: give --out a name ending in .gguf, not {out.name!r}")
    targets = [out, modelfile_of(out)] if fmt == "gguf" else [out]
    existing = [t for t in targets if t.exists()]
    if not existing:
        return out
    if not force:
        raise Exists(f"{existing[0]} already exists; pass --force to replace it")
    expected = PEFT_FILES if fmt == "peft" else HF_FILES
    for t in existing:
        earlier = t.is_file() if fmt == "gguf" else t.is_dir() and {p.name for p in t.iterdir()} <= set(expected)
        if not earlier:
            raise Exists(f"{t} is not an earlier {fmt} export; not replacing it, even with --force")
    return out


@contextmanager
def new_folder(out):
    """Yield a fresh temp folder beside `out`; on success it becomes `out` (an earlier export is
    moved aside first and deleted after), on any error it is removed and `out` is as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        for p in [tmp, *tmp.iterdir()]:  # temp files are private (0600); an export is for sharing
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

