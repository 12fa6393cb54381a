"""A download: the model as this app's zip, or exported through export.py (the same files
`cli.py export` writes), built in a fresh temp folder and sent; the folder goes once it is sent,
and one a killed server left behind is swept at the next start."""

import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from fastapi.responses import FileResponse
from filelock import FileLock, Timeout
from starlette.background import BackgroundTask

from app import export
from app.web.model_cache import gone_is_not_found

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "lineage.json", "metrics.jsonl")
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors", "metrics.jsonl")

README_TXT = """{name}: a GPT trained with AZR Model Trainer ({params:,} parameters, {steps} steps).

Files
  config.json        the ModelConfig (vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_len)
  model.safetensors  the weights, GPT-2 names (transformer.wte.weight, transformer.h.0.attn.c_attn.weight, ...);
                     lm_head is tied to transformer.wte.weight and not stored
  tokenizer.json     the byte-level BPE tokenizer (Hugging Face `tokenizers` format)
  lineage.json       parent, books (with sha256), runs, versions
  metrics.jsonl      one JSON line per training step (loss, val_bpb on evaluation steps, ...)

Load it with the project's code (run from the project folder, this folder unzipped next to it):

    import json
    from files import load_tensors, load_weights
    from generate import SamplingConfig, generate
    from model import GPT, ModelConfig
    from tokenizer import Tokenizer

    model = GPT(ModelConfig.from_dict(json.load(open("{name}/config.json"))))
    tensors, meta = load_tensors("{name}/model.safetensors")  # checks the sha256 too
    load_weights(model, tensors)
    tok = Tokenizer.load("{name}/tokenizer.json")
    print(generate(model, tok, "Once upon a time", SamplingConfig(max_new_tokens=100)))

Or put it back into a data folder: copy {name}/ to <AZR_HOME>/models/{name}/ and run
`python cli.py generate {name} --prompt "..."` or `python server.py`.
"""


DOWNLOAD_PREFIX = "azr-export-"  # the temp folders downloads are built in
STALE_DOWNLOAD_S = 60  # a younger folder may be one a server has made but not locked yet


def send_built(build, filename, store, name, adapter=None):
    """Build a download of model `name` (or its adapter) in a fresh temp folder (build(folder) -> the
    file to send) and send it as `filename`; the folder goes once it is sent. It is locked until
    then, so that a server started after one was killed mid-download removes that folder, and never
    a live one (sweep_downloads)."""
    folder = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    lock = FileLock(folder / ".lock", thread_local=False)  # released by the task that sends: another thread
    lock.acquire(timeout=0)

    def cleanup():
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()
    try:
        with gone_is_not_found(store, name, adapter):
            path = build(folder)
    except BaseException:
        cleanup()
        raise
    media = "application/zip" if filename.endswith(".zip") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=filename, background=BackgroundTask(cleanup))


def sweep_downloads():
    """Remove the download folders a killed server left in the temp dir: those whose lock no process
    holds. The lock, not a pid in the name, tells a dead server's folder from a live one's: pids are
    reused, and a server in another container that shares /tmp has pids we cannot see."""
    for d in Path(tempfile.gettempdir()).glob(DOWNLOAD_PREFIX + "*"):
        lock = FileLock(d / ".lock", thread_local=False)
        try:
            if time.time() - d.stat().st_mtime < STALE_DOWNLOAD_S:
                continue
            lock.acquire(timeout=0)
        except (OSError, Timeout):  # held by a live server; not a folder; another user's
            continue
        shutil.rmtree(d, ignore_errors=True)
        lock.release()


def build_model_zip(store, name, tmp):
    """The named model's files (only those) and a README, zipped into folder `tmp`."""
    d = store.model_dir(name)
    info = store.info(name)
    readme = README_TXT.format(name=name, params=info["params"], steps=info["steps"])
    names = [f for f in MODEL_FILES if (d / f).exists()]
    return zip_folder(d, names, name, tmp / f"{name}.zip", {"README.txt": readme})


def build_export(store, name, fmt, dtype, adapter, tmp):
    """The files `cli.py export` writes (export.py), in folder `tmp`: a GGUF file as it is (what
    llama.cpp and LM Studio open), a folder zipped, and for "ollama" the GGUF and its Modelfile
    zipped together."""
    stem, gguf = f"{adapter or name}-{fmt}", fmt in ("gguf", "ollama")
    out = export.export(store, name, "gguf" if gguf else fmt, tmp / (f"{name}-{dtype}.gguf" if gguf else stem),
                        adapter, dtype)
    if fmt == "gguf":
        return out
    folder, names = (tmp, [out.name, export.modelfile_of(out).name]) if gguf else \
        (out, sorted(p.name for p in out.iterdir()))
    return zip_folder(folder, names, stem, tmp / f"{stem}.zip")


def zip_folder(folder, names, prefix, path, extra=None):
    """Zip the files `names` of `folder` (only those) under `prefix`/, plus `extra` {name: text}, to `path`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for fname in names:
            z.write(folder / fname, f"{prefix}/{fname}")
        for fname, text in (extra or {}).items():
            z.writestr(f"{prefix}/{fname}", text)
    return path


def build_adapter_zip(store, name, adapter, tmp):
    """The adapter's files (only those), zipped into folder `tmp`."""
    d = store.adapters.dir(name, adapter)
    return zip_folder(d, [f for f in ADAPTER_FILES if (d / f).exists()], adapter, tmp / f"{adapter}.zip")
