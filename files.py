"""Files that are never half-written: atomic writes, and tensors with a checksum.

A crash, a full disk or a kill -9 can stop a write at any byte. So nothing is written in place:
the bytes go to a temp file next to the target, are flushed to the disk (fsync), and the temp
file is moved over the target with os.replace, which is atomic. A reader sees the old file or
the new one, never a mix. Each temp file has a name no other writer uses (mkstemp), so two
threads or processes writing the same target at once cannot write into each other's temp file.

Weights and checkpoints are safetensors: raw tensors plus a JSON header, never pickle, so
loading a file cannot run code. The header also holds a sha256 of the tensor bytes, which
catches a file that was truncated or corrupted after it was written.
"""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
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


def tensors_sha256_of_file(path):
    """The checksum in a weights file's header: it names the exact weights (adapters record it)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("sha256")
