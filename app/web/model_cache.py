"""Models for generation, each loaded once and reloaded when its files change on disk (a finished
run, a rollback), so generating stays fast and never shows stale weights."""

import threading
from collections import OrderedDict
from contextlib import contextmanager

from starlette.exceptions import HTTPException


class ModelCache:
    """Models for generation, each loaded once and reloaded when its files change on disk.

    The key is (inode, mtime, size) of the weights, tokenizer and config: every write in the
    store replaces a file with os.replace, which gives it a new inode, so a finished run or a
    rollback is seen on the next request. The least recently used model is dropped past `size`."""

    def __init__(self, store, device, size=4):
        self.store, self.device, self.size = store, device, size
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name, adapter=None):
        """-> (model, tokenizer), with the LoRA adapter attached if one is named; 409 while the
        model has no tokenizer (never trained)."""
        d = self.store.model_dir(name)
        files = [d / f for f in ("model.safetensors", "tokenizer.json", "config.json")]
        if adapter:
            files.append(self.store.adapters.dir(name, adapter) / "adapter.safetensors")
        key = tuple(file_key(f) for f in files)
        with self.lock:
            hit = self.entries.get((name, adapter))
            if hit and hit[0] == key:
                self.entries.move_to_end((name, adapter))
                return hit[1], hit[2]
        with gone_is_not_found(self.store, name, adapter):
            tok = self.store.tokenizer(name)
            if tok is None:
                raise HTTPException(409, f"model {name!r} has no tokenizer yet: train it on a book first")
            if adapter:
                model = self.store.adapters.load(name, adapter, self.device)
            else:
                model = self.store.load_model(name, self.device).eval()
        with self.lock:
            self.entries[(name, adapter)] = (key, model, tok)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return model, tok

    def forget(self, name):
        with self.lock:
            for key in [k for k in self.entries if k[0] == name]:
                del self.entries[key]


@contextmanager
def gone_is_not_found(store, name, adapter=None):
    """A model or adapter deleted while a request reads its files fails the read: a file missing
    or cut off halfway. Answer as for one that was never there (NotFound: 404), not 500. While it
    is still there, the error is what it was."""
    try:
        yield
    except Exception:
        store.adapters.dir(name, adapter) if adapter else store.model_dir(name)  # NotFound once it is gone
        raise


def file_key(path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
