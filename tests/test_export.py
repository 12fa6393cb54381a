"""Exports, checked by the other tools themselves: transformers loads the HF folder and gives our
logits and greedy tokens, PEFT loads the adapter on top of it, the gguf package reads the GGUF
file back tensor for tensor. And an export never writes half a folder or over something else."""

import io
import re
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import cli
from app import export
from conftest import LOCAL_URL, ROOT, quick_train_config, tiny_config, trained_store
from files import Exists, StoreError
from generate import SamplingConfig, generate_ids
from lora import LoRAConfig, merge_lora
from app.runs import finetune
from server import create_app
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

PROMPTS = ["Once upon a time the keeper", "Жили-были старик"]  # English, and Russian in bytes-level BPE
LORA = LoRAConfig(r=4, alpha=8.0, targets=("c_attn", "attn.c_proj", "c_fc"), rslora=True)  # rsLoRA: alpha / sqrt(r)


@pytest.fixture(scope="module")
def store(tmp_path_factory, book_text):
    """A tiny model trained on the book, with a LoRA adapter 'ad' fine-tuned on top of it."""
    store = trained_store(tmp_path_factory.mktemp("export") / "home", book_text)
    model = store.load_model("tiny")
    with torch.no_grad():  # MLP inputs of a few units, where GELU's exact and tanh forms differ by ~1e-4
        for block in model.transformer.h:
            block.mlp.c_fc.weight *= 20
    store.save_weights("tiny", model)
    finetune(store, "tiny", ["book"], quick_train_config(steps=10), "ad", LORA)
    return store


@pytest.fixture(scope="module")
def hf_dir(store, tmp_path_factory):
    return export.export(store, "tiny", "hf", tmp_path_factory.mktemp("out") / "tiny-hf")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "missing, unexpected or mismatched keys"
    return model.eval()


def ids_of(store, prompt):
    return torch.tensor([store.tokenizer("tiny").encode(prompt)])


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("prompt", PROMPTS)
def test_transformers_gives_our_logits(store, hf_model, prompt):
    ours = store.load_model("tiny").eval()
    idx = ids_of(store, prompt)
    with torch.no_grad():
        assert (hf_model(idx).logits - ours(idx)[0]).abs().max() <= 1e-5


def test_transformers_greedy_tokens_are_ours(store, hf_model):
    idx, eot = ids_of(store, PROMPTS[0]), store.tokenizer("tiny").eot_id
    ours = [t for t, _ in generate_ids(store.load_model("tiny").eval(), idx, SamplingConfig(20, temperature=0), eot)]
    theirs = hf_model.generate(idx, do_sample=False, max_new_tokens=20)[0, idx.size(1):].tolist()
    assert len(ours) > 1 and theirs == ours


@pytest.mark.parametrize("prompt", PROMPTS)
def test_auto_tokenizer_cuts_text_into_our_ids(store, hf_dir, prompt):
    tok, ours = transformers.AutoTokenizer.from_pretrained(hf_dir), store.tokenizer("tiny")
    assert tok(prompt).input_ids == ours.encode(prompt)
    assert tok.decode(ours.encode(prompt)) == prompt
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == ours.eot_id


def test_hf_folder_declares_gpt2_and_our_sampling_defaults(hf_dir):
    cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    assert (cfg.model_type, cfg.n_inner, cfg.n_positions, cfg.activation_function) == ("gpt2", 64, 32, "gelu_pytorch_tanh")
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    sc = SamplingConfig()
    assert (gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (sc.temperature, sc.top_k, sc.top_p, sc.max_new_tokens)
    card = (hf_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "sha256" in card and "bits/byte" in card


def test_the_hf_folder_runs_in_a_text_generation_pipeline(hf_dir):
    pipe = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    out = pipe("Once upon a time", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")


# ----------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def peft_model(store, hf_dir, tmp_path_factory):
    adapter_dir = export.export(store, "tiny", "peft", tmp_path_factory.mktemp("out") / "ad-peft", adapter="ad")
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir)
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    return model.eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_peft_gives_our_adapters_logits(store, peft_model, prompt):
    ours, base = store.adapters.load("tiny", "ad", nf4=False), store.load_model("tiny").eval()
    idx = ids_of(store, prompt)
    with torch.no_grad():
        assert (ours(idx)[0] - base(idx)[0]).abs().max() > 1e-3  # the adapter changes something
        assert (peft_model(idx).logits - ours(idx)[0]).abs().max() <= 1e-5


def test_peft_merge_and_unload_equals_our_merge(store, peft_model):
    merged = peft_model.merge_and_unload().state_dict()
    ours = export.hf_state(merge_lora(store.adapters.load("tiny", "ad", nf4=False)))
    assert max((merged[k] - v).abs().max().item() for k, v in ours.items()) <= 1e-6


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_every_tensor(store, tmp_path, dtype):
    path = export.export(store, "tiny", "gguf", tmp_path / "new" / "tiny.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    ours = store.load_model("tiny").state_dict()
    assert len(tensors) == len(ours) and "output.weight" in tensors  # the tied head, written out
    for key, w in ours.items():
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        back, w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape), w.numpy()
        if dtype == "f32" or w.ndim == 1:
            assert np.array_equal(back, w), key
        elif dtype == "f16":
            assert np.array_equal(back, w.astype(np.float16).astype(np.float32)), key
        else:  # q8_0: each block of 32 rounds to 1/127 of its largest weight
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and np.abs(back - w).max() <= np.abs(w).max() / 127, key


def test_gguf_metadata_is_as_written(store, tmp_path):
    fields = gguf.GGUFReader(export.export(store, "tiny", "gguf", tmp_path / "tiny.gguf")).fields
    meta = {k: f.contents() for k, f in fields.items()}
    tok, cfg = store.tokenizer("tiny"), store.config("tiny")
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert [meta[f"gpt2.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                                         "attention.head_count")] == [32, 32, 64, 2, 2]
    assert meta["tokenizer.ggml.tokens"][:300] == [tok.hf.id_to_token(i) for i in range(300)]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size == len(meta["tokenizer.ggml.token_type"])
    assert meta["tokenizer.ggml.token_type"][tok.eot_id] == gguf.TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == tok.vocab_size - 257  # 256 bytes and <|endoftext|> are not merges
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == tok.eot_id


def modelfile_lines(path):
    """{instruction: [arguments]} of a Modelfile, comments left out."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            word, rest = line.split(" ", 1)
            out.setdefault(word, []).append(rest)
    return out


def test_gguf_has_an_ollama_modelfile_with_our_sampling_defaults(store, tmp_path):
    path = export.export(store, "tiny", "gguf", tmp_path / "out" / "tiny.gguf")
    lines = modelfile_lines(tmp_path / "out" / "tiny.Modelfile")
    assert (path.parent / lines["FROM"][0]).resolve() == path  # Ollama reads FROM relative to the Modelfile
    assert lines["TEMPLATE"] == ['"""{{ .Prompt }}"""']  # the prompt as it is: a book model has no chat format
    params = dict(p.split(" ", 1) for p in lines["PARAMETER"])
    sc, ctx = SamplingConfig(), store.config("tiny").max_seq_len
    assert {k: float(v) for k, v in params.items()} == {
        "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p, "repeat_penalty": sc.repetition_penalty,
        "num_predict": min(sc.max_new_tokens, ctx // 2), "num_ctx": ctx, "repeat_last_n": -1}


def test_gguf_export_refuses_to_overwrite_a_modelfile_without_force(store, tmp_path):
    (tmp_path / "tiny.Modelfile").write_text("FROM llama3\n")
    with pytest.raises(Exists, match="tiny.Modelfile"):
        export.export(store, "tiny", "gguf", tmp_path / "tiny.gguf")
    assert not (tmp_path / "tiny.gguf").exists()
    export.export(store, "tiny", "gguf", tmp_path / "tiny.gguf", force=True)
    assert "FROM ./tiny.gguf" in (tmp_path / "tiny.Modelfile").read_text()


def test_gguf_gives_rows_bpe_never_filled_an_unused_token(tmp_path):
    tok = Tokenizer.train(["a short book, a short book"], 300)  # too short to learn 300 tokens
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "gpt2")
    export.add_vocab(w, tok, 300)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    fields = gguf.GGUFReader(tmp_path / "v.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tok.vocab_size < 300 and len(tokens) == len(types) == 300
    assert tokens[-1] == "[PAD299]" and types[-1] == gguf.TokenType.UNUSED and types[tok.vocab_size - 1] != types[-1]


# ----------------------------------------------------------------------------- where it writes


def test_export_refuses_to_overwrite_without_force(store, tmp_path):
    out = export.export(store, "tiny", "hf", tmp_path / "x")
    with pytest.raises(Exists, match="--force"):
        export.export(store, "tiny", "hf", out)
    (out / "config.json").write_text("stale")
    export.export(store, "tiny", "hf", out, force=True)
    assert "gpt2" in (out / "config.json").read_text() and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_force_never_replaces_a_folder_that_is_not_an_export(store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Exists, match="not an earlier hf export"):
        export.export(store, "tiny", "hf", tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_refuses_the_data_folder_and_wrong_options(store, tmp_path):
    with pytest.raises(StoreError, match="inside the data folder"):
        export.export(store, "tiny", "hf", store.home / "models" / "tiny" / "hf")
    for fmt, opts, words in [("gguf", {}, "ending in .gguf"), ("hf", {"dtype": "q8_0"}, "GGUF type"),
                             ("peft", {}, "name it"), ("hf", {"adapter": "ad"}, "as format peft"), ("onnx", {}, "format")]:
        with pytest.raises(ValueError, match=words):
            export.export(store, "tiny", fmt, tmp_path / "out", **opts)
    store.create_model("fresh", tiny_config())
    with pytest.raises(StoreError, match="no tokenizer yet"):
        export.export(store, "fresh", "hf", tmp_path / "fresh")


def test_a_failed_export_leaves_nothing_behind(store, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "model_card", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export.export(store, "tiny", "hf", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the same files from the CLI and the page


def test_cli_and_page_give_the_same_files(store, tmp_path):
    def cli_export(*args):
        assert cli.main(["--home", str(store.home), "export", "tiny", *args]) == 0

    cli_export("--format", "hf", "--out", str(tmp_path / "tiny-hf"))
    cli_export("--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "tiny.gguf"))
    cli_export("--format", "peft", "--adapter", "ad", "--out", str(tmp_path / "ad-peft"))
    with TestClient(create_app(store.home), base_url=LOCAL_URL) as client:
        hf = client.get("/download_model/tiny", params={"format": "hf"})
        gg = client.get("/download_model/tiny", params={"format": "gguf", "dtype": "q8_0"})
        pe = client.get("/download_adapter/tiny/ad", params={"format": "peft"})
        native = client.get("/download_adapter/tiny/ad")
        ollama = client.get("/download_model/tiny", params={"format": "ollama", "dtype": "q8_0"})
    assert gg.content == (tmp_path / "tiny.gguf").read_bytes()
    z = zipfile.ZipFile(io.BytesIO(ollama.content))  # the GGUF with its Modelfile, side by side
    assert sorted(z.namelist()) == ["tiny-ollama/tiny-q8_0.Modelfile", "tiny-ollama/tiny-q8_0.gguf"]
    assert z.read("tiny-ollama/tiny-q8_0.gguf") == gg.content
    assert z.read("tiny-ollama/tiny-q8_0.Modelfile").decode() == export.modelfile("tiny-q8_0.gguf", store.config("tiny"))
    assert 'filename="tiny-q8_0.gguf"' in gg.headers["content-disposition"]
    for r, folder in ((hf, "tiny-hf"), (pe, "ad-peft")):
        z = zipfile.ZipFile(io.BytesIO(r.content))
        files = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
        assert files == {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}, folder
    assert sorted(zipfile.ZipFile(io.BytesIO(native.content)).namelist()) == [
        "ad/adapter.safetensors", "ad/adapter_config.json", "ad/metrics.jsonl"]


def test_readme_snippets_for_transformers_and_peft_run(store, tmp_path):
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Use your model elsewhere")[1].split("\n## ")[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "llama_cpp" not in b]
    assert len(blocks) == 2
    export.export(store, "tiny", "hf", tmp_path / "exports" / "tiny-hf")
    export.export(store, "tiny", "peft", tmp_path / "exports" / "tiny-ru-peft", adapter="ad")
    code = "\n".join(blocks).replace("max_new_tokens=50", "max_new_tokens=5")  # the tiny model's context is 32
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
