"""The model store: every model, book and version on disk, written so that nothing is ever lost.

    <home>/models/<name>/config.json        the ModelConfig
                         model.safetensors  the current weights (sha256 of the tensors inside)
                         tokenizer.json     the BPE trained on the model's first books
                         lineage.json       parent, books (with sha256), runs, steps: genealogy
                         metrics.jsonl      one line per training step / evaluation
                         versions/vNNN/     a snapshot per finished run, for rollback
                         adapters/<a>/      LoRA adapters trained on top of this model (adapters.py)
    <home>/checkpoints/<name>/              training state for exact resume (see azr_trainer)
    <home>/books/<book>.txt + .json         cleaned UTF-8 text + how it was read (shelf.py)
    <home>/locks/                           one lock file per model and book (never deleted)

A Store holds the models (their weights, lineage, versions and metrics) and two parts of its own
by kind: `store.books` (shelf.py) and `store.adapters` (adapters.py).

Four rules keep it safe. Names are checked against one pattern (names.py: no '/', '..' or NUL
can reach the file system). Every write goes through files.py: a temp file moved into place with
os.replace, which is atomic, so a crash leaves the old file or the new one, never half of one.
Every change to a model or a book happens under its lock (files.held), across threads and
processes: "does it exist? then create it" and "read the lineage, add a run, write it back"
cannot interleave with another change, and a training run holds its model's *lease* for its
whole length, so two runs never train one model and a rollback or delete waits for none.
Weights are safetensors with a sha256 of their tensors, never pickle, so loading a file cannot
run code and a corrupted file is caught.
"""

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from config import check_seed, echo
from files import (CorruptFile, Exists, InUse, NotFound, StoreError, held, load_tensors, load_weights, replacing, save_tensors,
                   tensors_sha256_of_file, weights_of, write_json)
from model import GPT, ModelConfig
from sizing import check_fits_in_memory, param_count
from tokenizer import Tokenizer

from app import records
from app.adapters import Adapters
from app.names import NAME_RE, check_name
from app.shelf import Shelf

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the folder above app/
HOME_HELP = "data folder (default: $AZR_HOME, else the project folder; ~/.azr when installed with pip)"


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
        self.books = Shelf(self.home)  # books/: the texts runs train on
        self.adapters = Adapters(self)  # models/<name>/adapters/: LoRA corrections of one model

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

    # paths -------------------------------------------------------------------
    def model_dir(self, name, must_exist=True):
        d = self.home / "models" / check_name(name)
        if must_exist and not (d / "config.json").exists():
            raise NotFound(f"no model named {name!r}; create it first (see `python cli.py list`)")
        return d

    def checkpoint_dir(self, name):
        return self.home / "checkpoints" / check_name(name)

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
                "name": name, "created": records.now(), "parent": parent, "books": list(books), "runs": [],
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
                "has_tokenizer": (d / "tokenizer.json").exists(), "adapters": self.adapters.list(name),
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
            entry = {"version": version, "date": records.now(), "steps": lin["steps"], "best_val_bpb": lin["best_val_bpb"], "note": note}
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
        d = self.adapters.dir(name, adapter, must_exist=False) if adapter else self.model_dir(name)
        p = d / "metrics.jsonl"
        if not p.exists():
            return []
        with open(p, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()[since_line:]
        return [row for row in map(_json_or_none, lines) if row is not None]


def copy_file(src, dst):
    """Copy src over dst atomically."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def _json_or_none(line):
    """A metrics row, or None for a blank line, one torn by a crash in the middle of writing it, or
    one that is no row (not a JSON object)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def sweep_temp_files(home):
    """Remove the temp files a kill -9 left mid-write in books/ and models/ (files.replacing's
    hidden `.FILE.*.tmp`: never read, but litter that grows with every crash). Only those of an
    object whose locks are free at this moment: a live writer, here or in another process,
    holds its object's lock (a training run: its lease) while its temp file grows."""
    swept = []
    for tmp in (home / "books").glob(".*.tmp"):
        swept += _sweep(home, tmp, [f"book-{tmp.name[1:].split('.')[0]}"])
    for tmp in (home / "models").glob("*/**/.*.tmp"):
        name = tmp.relative_to(home / "models").parts[0]
        swept += _sweep(home, tmp, [f"model-{name}", f"model-{name}.run"])
    return swept


def _sweep(home, tmp, locks):
    if not all(NAME_RE.fullmatch(lock.split("-", 1)[1].removesuffix(".run")) for lock in locks):
        return []  # not the temp file of a stored object: not ours to remove
    try:
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(held(home / "locks" / f"{lock}.lock", "in use", wait_s=0))
            tmp.unlink(missing_ok=True)
            return [tmp]
    except InUse:
        return []
