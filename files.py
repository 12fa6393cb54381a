"""Files that are never half-written: atomic writes, and tensors with a checksum.

A crash, a full disk or a kill -9 can stop a write at any byte. So nothing is written in place:
the bytes go to a temp file next to the target, are flushed to the disk (fsync), and the temp
file is moved over the target with os.replace, which is atomic. A reader sees the old file or
the new one, never a mix. Each temp file has a name no other writer uses (mkstemp), so two
threads or processes writing the same target at once cannot write into each other's temp file.

An atomic file is not yet a safe *object*: a model is several files, and "read the lineage, add
a run, write it back" loses one of two concurrent updates even when each write is atomic. So
every change to one object (a model, a book) happens while holding that object's lock: a file
lock (flock, via the `filelock` package), which serialises the threads of one server and the
processes of a CLI and a server working on one data folder alike.

Weights and checkpoints are safetensors: raw tensors plus a JSON header, never pickle, so
loading a file cannot run code. The header also holds a sha256 of the tensor bytes, which
catches a file that was truncated or corrupted after it was written.
"""

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class StoreError(ValueError):
    """A request the store cannot satisfy; the message says why."""


class NotFound(StoreError):
    pass


class CorruptFile(StoreError):
    pass


class Exists(StoreError):
    """The name is taken (the web API answers 409 Conflict)."""


class InUse(StoreError):
    """Another thread or process holds the object (the web API answers 409 Conflict)."""


LOCK_WAIT_S = 120  # the longest a change waits for another one to the same object (a big model's weights)


@contextmanager
def held(lock_path, busy, wait_s=LOCK_WAIT_S):
    """Hold the lock at `lock_path` for the block, waiting up to `wait_s` seconds (0: one try);
    InUse(busy) if it stays taken.

    One FileLock object per path and process (is_singleton), with its holds counted per thread
    (thread_local, the default): another thread, like another process, waits for the flock, while
    the holding thread may take it again (a store method calling another). tests/test_concurrency.py
    checks these three rules."""
    lock = FileLock(lock_path, is_singleton=True, poll_interval=0.01)
    try:
        lock.acquire(timeout=wait_s, blocking=wait_s > 0)
    except Timeout:
        raise InUse(busy) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def replacing(path):
    """Yield a fresh temp path beside `path`; on success it replaces `path` atomically, on any
    error it is removed and `path` keeps its old contents."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path, data):
    """Write bytes or str to path; an error leaves the old file."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shown(path):
    """A path as error messages show it: its last two parts, never where the data folder is."""
    return "/".join(Path(path).parts[-2:])


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/[^\s'\"]+")


def hide_paths(message, home):
    """A message for a web client: absolute paths inside it become paths relative to the data
    folder `home` (or their last two parts), so an error never tells where the data lives."""
    def relative(m):
        path = Path(m.group())
        return str(path.relative_to(home)) if path.is_relative_to(home) else shown(path)
    return _ABSOLUTE_PATH.sub(relative, message)


# ----------------------------------------------------------------------------- tensors


def tensors_sha256(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path, tensors, meta=None):
    """safetensors file with our JSON metadata and a checksum of the tensors, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"meta": json.dumps(meta or {}), "sha256": tensors_sha256(tensors)}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path):
    """-> (tensors, meta). CorruptFile if the file is truncated, garbled or fails its checksum."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{shown(path)} not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFile(f"{shown(path)} is damaged (truncated or not a safetensors file): {e}") from e
    if header.get("sha256") != tensors_sha256(tensors):
        raise CorruptFile(f"{shown(path)} failed its checksum: the file was corrupted after it was written")
    return tensors, json.loads(header.get("meta", "{}"))


def weights_of(model, trainable_only=False):
    """A model's weights by name, as they are saved: every parameter (a tied weight once: GPT's
    lm_head is its wte), or with trainable_only those a run trains (a fine-tune: only the LoRA
    adapter's A and B; the frozen base stays where it came from)."""
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad or not trainable_only}


def load_weights(model, tensors, trainable_only=False):
    """Copy saved weights into the parameters weights_of names: all of them, of the same shapes,
    or CorruptFile (another config, or an adapter of another rank or targets)."""
    own = weights_of(model, trainable_only)
    if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise CorruptFile(f"the saved weights do not fit this model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, or other shapes): another config, or an adapter of another "
                          f"rank or targets")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


def tensors_sha256_of_file(path):
    """The checksum in a weights file's header: it names the exact weights (adapters record it)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("sha256")
