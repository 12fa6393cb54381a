"""The model store: every model, book and version on disk, written so that nothing is ever lost.

    <home>/models/<name>/config.json        the ModelConfig
                         model.safetensors  the current weights (sha256 of the tensors inside)
                         tokenizer.json     the BPE trained on the model's first books
                         lineage.json       parent, books (with sha256), runs, steps: genealogy
                         metrics.jsonl      one line per training step / evaluation
                         versions/vNNN/     a snapshot per finished run, for rollback
                         adapters/<a>/      LoRA adapters trained on top of this model
    <home>/checkpoints/<name>/              training state for exact resume (see azr_trainer)
    <home>/books/<book>.txt + .json         cleaned UTF-8 text + how it was read
    <home>/locks/                           one lock file per model and book (never deleted)

Four rules keep it safe. Names are checked against one pattern (no '/', '..' or NUL can reach
the file system). Every write goes through files.py: a temp file moved into place with
os.replace, which is atomic, so a crash leaves the old file or the new one, never half of one.
Every change to a model or a book happens under its lock (files.held), across threads and
processes: "does it exist? then create it" and "read the lineage, add a run, write it back"
cannot interleave with another change, and a training run holds its model's *lease* for its
whole length, so two runs never train one model and a rollback or delete waits for none.
Weights are safetensors with a sha256 of their tensors, never pickle, so loading a file cannot
run code and a corrupted file is caught.
"""

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from config import check_seed, echo
import records
from files import (CorruptFile, Exists, InUse, NotFound, StoreError, atomic_write, held, load_tensors, replacing, save_tensors,
                   tensors_sha256_of_file, write_json)
from azr_trainer import load_trained_weights
from lora import LoRAConfig, attach_lora, count_params, lora_state, merge_lora
from model import GPT, ModelConfig
from sizing import check_fits_in_memory, param_count
from tokenizer import MAX_UNZIPPED_BYTES, BookError, Tokenizer, read_book

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROJECT_DIR = Path(__file__).resolve().parent
HOME_HELP = "data folder (default: $AZR_HOME, else the project folder; ~/.azr when installed with pip)"


def check_name(name, what="model"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(f"invalid {what} name {name[:80]!r}: use 1-64 letters, digits, '_' or '-'"
                         if isinstance(name, str) else f"invalid {what} name: use 1-64 letters, digits, '_' or '-'")
    return name


def home_dir(home=None):
    return Path(home or os.environ.get("AZR_HOME") or default_home()).resolve()


def default_home(project_dir=PROJECT_DIR):
    """Run from a checkout (`python cli.py`), the data lives in the project folder, beside the code.
    Installed (`pip install .`), this file sits in site-packages, which is no place for data and
    may not be writable: then ~/.azr. A checkout is known by its pyproject.toml, which an install
    does not copy."""
    return project_dir if (project_dir / "pyproject.toml").exists() else Path.home() / ".azr"


# ----------------------------------------------------------------------------- the store


class Store:
    def __init__(self, home=None):
        self.home = home_dir(home)
        try:
            for d in ("models", "checkpoints", "books", "locks"):
                (self.home / d).mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file by that name, a folder we may not write to
            raise StoreError(f"cannot keep data in {self.home} ({e.strerror}): give a folder you can write to "
                             f"(--home, or $AZR_HOME)") from None

    # locks -------------------------------------------------------------------
    def locked(self, name):
        """Hold model `name` while changing it (a thread that holds it may take it again)."""
        return held(self.home / "locks" / f"model-{check_name(name)}.lock",
                    f"model {name!r} is busy: another process has been changing it for minutes; try again")

    def training(self, name):
        """Hold model `name`'s lease for a whole training run: taken at once or refused, never
        waited for. A change that must not happen during a run (rollback, delete) takes it too,
        briefly, inside `locked(name)`, so two such changes queue on the lock instead."""
        self.model_dir(name)  # NotFound first: a lock file only for a model that exists
        return held(self.home / "locks" / f"model-{check_name(name)}.run.lock",
                    f"model {name!r} is being trained (by this server or another process, such as "
                    f"`python cli.py train`); wait for the run to finish or stop it first", wait_s=0)

    def book_locked(self, name):
        return held(self.home / "locks" / f"book-{check_name(name, 'book')}.lock",
                    f"book {name!r} is busy: another process has been changing it for minutes; try again")

    def sweep_temp_files(self):
        """Remove the temp files a kill -9 left mid-write in books/ and models/ (files.replacing's
        hidden `.FILE.*.tmp`: never read, but litter that grows with every crash). Only those of an
        object whose locks are free at this moment: a live writer, here or in another process,
        holds its object's lock (a training run: its lease) while its temp file grows."""
        swept = []
        for tmp in (self.home / "books").glob(".*.tmp"):
            swept += self._sweep(tmp, [f"book-{tmp.name[1:].split('.')[0]}"])
        for tmp in (self.home / "models").glob("*/**/.*.tmp"):
            name = tmp.relative_to(self.home / "models").parts[0]
            swept += self._sweep(tmp, [f"model-{name}", f"model-{name}.run"])
        return swept

    def _sweep(self, tmp, locks):
        if not all(NAME_RE.fullmatch(lock.split("-", 1)[1].removesuffix(".run")) for lock in locks):
            return []  # not the temp file of a stored object: not ours to remove
        try:
            with ExitStack() as stack:
                for lock in locks:
                    stack.enter_context(held(self.home / "locks" / f"{lock}.lock", "in use", wait_s=0))
                tmp.unlink(missing_ok=True)
                return [tmp]
        except InUse:
            return []

    # paths -------------------------------------------------------------------
    def model_dir(self, name, must_exist=True):
        d = self.home / "models" / check_name(name)
        if must_exist and not (d / "config.json").exists():
            raise NotFound(f"no model named {name!r}; create it first (see `python cli.py list`)")
        return d

    def checkpoint_dir(self, name):
        return self.home / "checkpoints" / check_name(name)

    def book_path(self, name):
        return self.home / "books" / f"{check_name(name, 'book')}.txt"

    def adapter_dir(self, name, adapter, must_exist=True):
        """models/<name>/adapters/<adapter>/: adapter.safetensors + adapter_config.json (lora.py)."""
        d = self.model_dir(name) / "adapters" / check_name(adapter, "adapter")
        if must_exist and not (d / "adapter_config.json").exists():
            raise NotFound(f"model {name!r} has no adapter {adapter!r}; its adapters: {self.list_adapters(name)}")
        return d

    # models ------------------------------------------------------------------
    def create_model(self, name, cfg, seed=0, parent=None, model=None, tokenizer=None, books=(), steps=0):
        """A new model: fresh weights from `seed`, or given ones (`model`, `tokenizer`, the `books`
        and `steps` behind them: a merge). Of two creators of one name, one wins, the other gets Exists."""
        d = self.model_dir(name, must_exist=False)
        cfg.validate()
        check_seed(seed)
        check_fits_in_memory(cfg)
        with self.locked(name):
            if (d / "config.json").exists():
                raise Exists(f"a model named {name!r} already exists; pick another name or delete it")
            for leftover in (d, self.checkpoint_dir(name)):  # of a create or delete cut off by a crash
                shutil.rmtree(leftover, ignore_errors=True)
            model = model if model is not None else GPT(cfg, torch.Generator().manual_seed(seed))
            d.mkdir(parents=True)
            self.save_weights(name, model)
            if tokenizer is not None:
                tokenizer.save(d / "tokenizer.json")
            write_json(d / "lineage.json", {
                "name": name, "created": _now(), "parent": parent, "books": list(books), "runs": [],
                "steps": steps, "best_val_bpb": None, "versions": [],
            })
            write_json(d / "config.json", cfg.to_dict())  # written last: it marks the model as complete
        return model

    def config(self, name):
        return ModelConfig.from_dict(self._read(name, "config.json", records.ModelConfigFile))

    def load_model(self, name, device="cpu", version=None):
        """The current weights of `name`, or those of one of its saved versions (vNNN)."""
        cfg = self.config(name)
        d = self.model_dir(name)
        if version:
            self.version_entry(name, version)
        path = d / "versions" / version / "model.safetensors" if version else d / "model.safetensors"
        tensors, _ = load_tensors(path)
        model = GPT(cfg)
        load_weights(model, tensors)
        return model.to(device)

    def save_weights(self, name, model, extra_meta=None):
        with self.locked(name):
            save_tensors(self.model_dir(name, must_exist=False) / "model.safetensors", weights_of(model), extra_meta)

    def weights_sha256(self, name):
        """The checksum in the header of the current weights: names the exact weights (adapters
        record the one they were trained on)."""
        return tensors_sha256_of_file(self.model_dir(name) / "model.safetensors")

    def tokenizer(self, name):
        """The model's tokenizer, or None before its first training run."""
        p = self.model_dir(name) / "tokenizer.json"
        if not p.exists():
            return None
        try:
            return Tokenizer.load(p)
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise CorruptFile(f"{name}/tokenizer.json is damaged ({str(e)[:200]}); delete the model "
                              f"(`python cli.py delete {name}`, or Delete on the Models tab)") from None

    def lineage(self, name):
        return self._read(name, "lineage.json", records.Lineage)

    def update_lineage(self, name, **changes):
        """Set fields of lineage.json. A caller that computes them from the lineage it read holds
        `locked(name)` around both, so no concurrent update is lost in between."""
        with self.locked(name):
            lin = self.lineage(name)
            lin.update(changes)
            write_json(self.model_dir(name) / "lineage.json", lin)
        return lin

    def _read(self, name, file, kind):
        """A model's JSON record (records.py); CorruptFile saying what to do if it is damaged."""
        try:
            return records.load(self.model_dir(name) / file, kind)
        except CorruptFile as e:
            raise CorruptFile(f"{e}; repair the file by hand, or delete the model (`python cli.py delete {name}`, "
                              f"or Delete on the Models tab)") from None

    def info(self, name):
        d = self.model_dir(name)
        with self.locked(name):  # a consistent view: no half-finished change of this model
            cfg, lin = self.config(name), self.lineage(name)
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            return {
                "name": name, "config": cfg.to_dict(), "params": param_count(cfg), "size_bytes": size,
                "steps": lin["steps"], "best_val_bpb": lin["best_val_bpb"], "parent": lin["parent"],
                "books": lin["books"], "versions": lin.get("versions", []), "created": lin["created"],
                "has_tokenizer": (d / "tokenizer.json").exists(), "adapters": self.list_adapters(name),
            }

    def list_models(self):
        """Every model's info; a model whose files cannot be read is listed as {name, damaged:
        what is wrong and what to do}, and the others are listed as usual."""
        out = []
        for n in sorted(p.parent.name for p in (self.home / "models").glob("*/config.json")):
            if not NAME_RE.fullmatch(n):
                continue
            try:
                out.append(self.info(n))
            except NotFound:
                continue  # deleted while we listed
            except (StoreError, OSError) as e:
                out.append({"name": n, "damaged": str(e)})
        return out

    def delete_model(self, name):
        with self.locked(name), self.training(name):
            d = self.model_dir(name)  # still there: a deleter that waited for the lock finds it gone
            shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)
            (d / "config.json").unlink()  # first: a half-deleted model no longer counts as a model
            shutil.rmtree(d)

    def delete_adapter(self, name, adapter):
        with self.locked(name), self.training(name):
            d = self.adapter_dir(name, adapter)
            (d / "adapter_config.json").unlink()  # first: a half-deleted adapter no longer counts
            shutil.rmtree(d)
            shutil.rmtree(self.checkpoint_dir(name) / "adapters" / adapter, ignore_errors=True)

    def list_adapters(self, name):
        d = self.model_dir(name) / "adapters"
        return sorted(p.parent.name for p in d.glob("*/adapter_config.json")) if d.exists() else []

    # adapters ----------------------------------------------------------------
    def save_adapter(self, name, adapter, model, lc, base_sha256, run=None):
        """adapters/<adapter>/adapter.safetensors (A and B of every wrapped layer) + adapter_config.json,
        written last: its presence marks a complete adapter."""
        info = {"name": adapter, "base_model": name, "base_sha256": base_sha256, "lora": lc.to_dict(),
                "params": count_params(model), "run": run, "saved": _now()}
        with self.locked(name):
            d = self.adapter_dir(name, adapter, must_exist=False)
            d.mkdir(parents=True, exist_ok=True)
            save_tensors(d / "adapter.safetensors", lora_state(model), {"base_sha256": base_sha256})
            write_json(d / "adapter_config.json", info)
        return info

    def adapter_info(self, name, adapter):
        try:
            return records.load(self.adapter_dir(name, adapter) / "adapter_config.json", records.AdapterConfig)
        except CorruptFile as e:
            raise CorruptFile(f"{e}; delete the adapter (`python cli.py delete {name} --adapter {adapter}`) and "
                              f"fine-tune it again") from None

    def load_adapter(self, name, adapter, device="cpu", nf4=None):
        """The base model `name` with its saved adapter attached, in eval mode.

        nf4=None rebuilds the base as it was during training (NF4 for a QLoRA adapter); False/True
        force a full-precision or NF4 base. Refuses an adapter trained on other base weights."""
        info = self.adapter_info(name, adapter)
        self.check_base(name, info)
        lc = LoRAConfig.from_dict(info["lora"])
        model = attach_lora(self.load_model(name, device), lc if nf4 is None else replace(lc, nf4=nf4))
        tensors, _ = load_tensors(self.adapter_dir(name, adapter) / "adapter.safetensors")
        load_trained_weights(model, tensors)
        return model.eval()

    def check_base(self, name, info):
        """An adapter is a correction to one exact set of base weights: anything else is refused."""
        if info["base_model"] != name:
            raise StoreError(f"adapter {info['name']!r} was trained on model {info['base_model']!r}, not {name!r}")
        current = self.weights_sha256(name)
        if info["base_sha256"] != current:
            raise StoreError(
                f"adapter {info['name']!r} was trained on other weights of {name!r} (sha256 "
                f"{info['base_sha256'][:12]}, now {current[:12]}): the model was trained further or rolled "
                f"back since. Roll it back to the version the adapter was trained on, or fine-tune again.")

    def merge_adapter(self, name, adapter, out):
        """A new model `out` = base `name` with `adapter` merged in; copies the tokenizer, and its
        lineage records parent {model, adapter}.

        A QLoRA adapter is merged into the full-precision base weights W, not into NF4(W): it was
        trained against NF4(W), so the merged model differs from what it learned with by the
        quantization error of W (see quant.nf4_report), but it stays a full-precision model."""
        info = self.adapter_info(name, adapter)
        model = merge_lora(self.load_adapter(name, adapter, nf4=False))
        base, run = self.lineage(name), info.get("run") or {}
        self.create_model(out, model.config, parent={"model": name, "adapter": adapter}, model=model,
                          tokenizer=self.tokenizer(name), books=merge_books(base["books"], run.get("books", [])),
                          steps=base["steps"] + run.get("steps", 0))
        return self.lineage(out)

    # versions ----------------------------------------------------------------
    def save_version(self, name, note=""):
        """Snapshot the current weights as the next version vNNN; returns its name."""
        with self.locked(name):
            d = self.model_dir(name)
            lin = self.lineage(name)
            version = f"v{len(lin.get('versions', [])) + 1:03d}"
            vdir = d / "versions" / version
            vdir.mkdir(parents=True, exist_ok=True)
            copy_file(d / "model.safetensors", vdir / "model.safetensors")
            entry = {"version": version, "date": _now(), "steps": lin["steps"], "best_val_bpb": lin["best_val_bpb"], "note": note}
            self.update_lineage(name, versions=lin.get("versions", []) + [entry])
        return version

    def version_entry(self, name, version):
        """The lineage's record of a saved version; NotFound for any other name (also a path)."""
        versions = self.lineage(name).get("versions", [])
        entry = next((v for v in versions if v["version"] == version), None)
        if entry is None:
            raise NotFound(f"model {name!r} has no version {echo(version)}; versions: {[v['version'] for v in versions]}")
        return entry

    def rollback(self, name, version):
        with self.locked(name), self.training(name):
            d = self.model_dir(name)
            entry = self.version_entry(name, version)
            load_tensors(d / "versions" / version / "model.safetensors")  # verify before replacing
            copy_file(d / "versions" / version / "model.safetensors", d / "model.safetensors")
            return self.update_lineage(name, steps=entry["steps"], rolled_back_to=version)

    # metrics -----------------------------------------------------------------
    def metrics(self, name, since_line=0, adapter=None):
        d = self.adapter_dir(name, adapter, must_exist=False) if adapter else self.model_dir(name)
        p = d / "metrics.jsonl"
        if not p.exists():
            return []
        with open(p, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()[since_line:]
        return [row for row in map(_json_or_none, lines) if row is not None]

    # books -------------------------------------------------------------------
    def add_book(self, name, data, filename="book.txt", max_bytes=MAX_UNZIPPED_BYTES):
        """Read raw bytes (any encoding/format), store the clean UTF-8 text; returns its info.
        Of two uploads under one name, one is stored, the other gets Exists. `max_bytes` caps
        what an .epub may inflate to (tokenizer.read_book)."""
        path = self.book_path(name)
        book = read_book(data, filename, max_bytes)  # the slow part, outside the lock
        with self.book_locked(name):
            if path.exists():
                raise Exists(f"a book named {name!r} already exists; delete it first or pick another name")
            return self._save_book(path, book, len(data), filename)

    def book_info(self, name):
        path = self.book_path(name)
        with self.book_locked(name):
            if not path.is_file():
                raise NotFound(f"no book named {name!r}; upload it first (known: {[b['name'] for b in self.list_books()]})")
            meta = path.with_suffix(".json")
            if not meta.exists():
                return self._describe_loose_book(path)
            try:
                return records.load(meta, records.BookMeta)
            except CorruptFile as e:
                raise CorruptFile(f"{e}; remove that file to have the book's text read again, or delete the book "
                                  f"(Delete on the Books tab)") from None

    def _describe_loose_book(self, path):
        """A .txt dropped into books/ by hand: read it like an upload, once."""
        data = path.read_bytes()
        return self._save_book(path, read_book(data, path.name), len(data), path.name)

    def _save_book(self, path, book, n_bytes, filename):
        """The book's clean UTF-8 text at `path` and its info next to it (written last)."""
        text = book.text.encode("utf-8")
        info = {"name": path.stem, "filename": os.path.basename(filename), "bytes": n_bytes, "text_bytes": len(text),
                "sha256": hashlib.sha256(text).hexdigest(), **book.report(), "added": _now()}
        if not path.exists() or path.read_bytes() != text:
            atomic_write(path, text)
        write_json(path.with_suffix(".json"), info)
        return info

    def book_text(self, name):
        return self.read_book(name)[1]

    def read_book(self, name):
        """(info, text) of a stored book, read together: the text is the one its sha256 names."""
        with self.book_locked(name):
            info = self.book_info(name)
            return info, self.book_path(name).read_text(encoding="utf-8")

    def list_books(self):
        """Every book's info; a book whose info is damaged is listed as {name, damaged: what to do}."""
        out = []
        for p in sorted((self.home / "books").glob("*.txt")):
            if not (NAME_RE.fullmatch(p.stem) and p.is_file()):
                continue  # a folder named like a book is not one
            try:
                out.append(self.book_info(p.stem))
            except NotFound:
                continue  # deleted while we listed
            except BookError:
                continue  # an unreadable file dropped in by hand is not a book
            except (StoreError, OSError) as e:
                out.append({"name": p.stem, "damaged": str(e)})
        return out

    def delete_book(self, name):
        """Delete a book's text and info; also of a book whose info is damaged."""
        path = self.book_path(name)
        with self.book_locked(name):
            if not path.is_file():
                raise NotFound(f"no book named {name!r}")
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)

    def resolve_book(self, ref, allow_path=False):
        """A book given as a store name -> (name, text, sha256). Only the CLI passes allow_path,
        to name a file by its path; a name from the web API never becomes a path on the server."""
        if not self._is_path(ref, allow_path):
            info, text = self.read_book(check_name(ref, "book"))
            return ref, text, info["sha256"]
        p = Path(ref)
        if not p.is_file():
            raise NotFound(f"no book {ref!r}: not an uploaded book name and not a file")
        text = read_book(p.read_bytes(), p.name).text
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", p.stem)[:64] or "book"
        return stem, text, hashlib.sha256(text.encode()).hexdigest()

    def book_sha256(self, ref, allow_path=False):
        """The sha256 of a book's text as it is now (a path is read again)."""
        if not self._is_path(ref, allow_path):
            return self.book_info(check_name(ref, "book"))["sha256"]
        return self.resolve_book(ref, allow_path)[2]

    def _is_path(self, ref, allow_path):
        """Only where allowed (the CLI) is a book named by a path, and a stored book's name wins."""
        return allow_path and not (NAME_RE.fullmatch(ref) and self.book_path(ref).exists())


def merge_books(known, new):
    """The books of a lineage plus the new ones (by sha256), in order."""
    seen = {b["sha256"] for b in known}
    return known + [b for b in new if b["sha256"] not in seen]


def copy_file(src, dst):
    """Copy src over dst atomically."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def weights_of(model):
    """The state dict to save: the tied lm_head is the same tensor as wte, so it is left out."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_weights(model, tensors):
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise CorruptFile(f"weights do not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _json_or_none(line):
    """A metrics row, or None for a blank line, one torn by a crash in the middle of writing it, or
    one that is no row (not a JSON object)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S")
