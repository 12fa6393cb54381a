"""Text in, tokens out: byte-level BPE, and the train/val token arrays a model trains on.

1. **Byte-level BPE** (Sennrich et al. 2016; byte-level as in GPT-2). The base alphabet is the 256
   bytes, so *any* text encodes and decodes exactly, Cyrillic and Polish included; training
   merges the most frequent adjacent pairs until the vocabulary reaches the model's vocab_size.
   HF `tokenizers` does the training (fast, Rust); `token_bytes` shows the bytes behind each id.
2. **Token arrays.** The book is encoded once into a flat uint16/uint32 file read through
   numpy.memmap, so a book of any length costs disk, not a list of Python ints. Every 10th
   contiguous chunk is held out for validation, so val text comes from the whole book, not just
   its end.

The text comes in already read and cleaned: reading book files (encodings, .epub, .fb2, Gutenberg
headers) is the product's job (app/books.py).
"""


import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from files import replacing, write_json

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]


# ----------------------------------------------------------------------------- BPE


def _byte_to_unicode():
    """GPT-2's byte <-> printable-character table: byte-level BPE works on strings, so each
    byte is shown as a visible character (printable Latin-1 bytes as themselves, the rest
    shifted above U+0100). The same table HF's ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class Tokenizer:
    """A thin wrapper over a trained HF byte-level BPE: ids <-> text, ids -> bytes."""

    def __init__(self, hf):
        self.hf = hf
        self.eot_id = hf.token_to_id(EOT)
        self.vocab_size = hf.get_vocab_size()
        vocab = hf.get_vocab()
        self._bytes = [b""] * self.vocab_size
        for tok, i in vocab.items():
            self._bytes[i] = tok.encode() if tok in SPECIAL_TOKENS else bytes(_UNICODE_TO_BYTE[c] for c in tok)

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn merges on an iterable of strings until there are `vocab_size` tokens."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            min_frequency=2,  # a pair seen once is noise, not a word piece
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path):
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path):
        with replacing(path) as tmp:
            self.hf.save(str(tmp))

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.token_bytes_of(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The raw bytes of one token: may be part of a multi-byte UTF-8 character. An id past the
        vocabulary spells nothing: a small book can give fewer merges than the model's vocab_size,
        and a barely trained model may still sample one of those never-used rows."""
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""

    def token_bytes_of(self, ids):
        return b"".join(map(self.token_bytes, ids))

    def merges(self):
        """The learned BPE merges in the order they were learned: [(left bytes, right bytes), ...].
        Merge i joins the pair that was the most frequent after merges 0..i-1."""
        pairs = json.loads(self.hf.to_str())["model"]["merges"]
        return [tuple(bytes(_UNICODE_TO_BYTE[c] for c in part) for part in pair) for pair in pairs]

    def byte_lengths(self):
        """(V,) int array: bytes of text each token stands for (bits-per-byte needs it)."""
        return np.array([len(b) for b in self._bytes], dtype=np.int64)

    def fingerprint(self):
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- token arrays


def encode_to_file(tok, text, path, chunk_chars=1_000_000):
    """Encode `text` in pieces straight into a flat binary file of token ids; returns its length.
    Pieces end at paragraph breaks so no BPE merge straddles a cut."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    n = 0
    with open(path, "wb") as f:
        for piece_ids in _encode_pieces(tok, text, chunk_chars):
            arr = np.asarray(piece_ids, dtype=dtype)
            f.write(arr.tobytes())
            n += arr.size
    return n


def _encode_pieces(tok, text, chunk_chars):
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        cut = text.rfind("\n\n", start, end) if end < len(text) else -1
        end = cut + 2 if cut > start else end
        pieces.append(text[start:end])
        start = end
        if len(pieces) == 8:  # encode_batch runs the 8 pieces in parallel
            yield from tok.encode_batch(pieces)
            pieces = []
    yield from tok.encode_batch(pieces)


def split_train_val(all_path, train_path, val_path, dtype, val_every=10, n_chunks=100):
    """Cut the token file into `n_chunks` contiguous chunks; every `val_every`-th goes to val."""
    data = np.memmap(all_path, dtype=dtype, mode="r")
    bounds = np.linspace(0, len(data), n_chunks + 1).astype(np.int64)
    with open(train_path, "wb") as tr, open(val_path, "wb") as va:
        for c in range(n_chunks):
            (va if c % val_every == val_every - 1 else tr).write(data[bounds[c]:bounds[c + 1]].tobytes())


def prepare_tokens(tok, book_texts, cache_dir, val_fraction=0.1):
    """Encode books (a dict name -> text) into cache_dir/{train,val}.bin once; return a dict
    with the memmaps. Cached by tokenizer fingerprint + book contents."""
    key = hashlib.sha256((tok.fingerprint() + str(val_fraction)).encode())
    for name in sorted(book_texts):
        key.update(hashlib.sha256(book_texts[name].encode()).digest())
    d = Path(cache_dir) / key.hexdigest()[:16]
    meta_path = d / "meta.json"
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    if not meta_path.exists():
        # build in a private folder and rename it into place: two processes (a training run and
        # an evaluation) may encode the same books at once, and must not write each other's files
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=cache_dir))
        try:
            text = ("\n" + EOT + "\n").join(book_texts[n] for n in sorted(book_texts))
            n = encode_to_file(tok, text, tmp / "all.bin")
            if n < 64:
                raise ValueError(f"the book gives only {n} tokens; training needs a longer text")
            split_train_val(tmp / "all.bin", tmp / "train.bin", tmp / "val.bin", dtype, val_every=round(1 / val_fraction))
            os.remove(tmp / "all.bin")
            write_json(tmp / "meta.json", {"tokens": n, "dtype": np.dtype(dtype).name, "books": sorted(book_texts)})
            if d.exists() and not meta_path.exists():
                shutil.rmtree(d, ignore_errors=True)  # an unfinished folder from an older version
            os.rename(tmp, d)  # fails if another process got there first: its files are the same
        except OSError:
            if not meta_path.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {s: np.memmap(d / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
