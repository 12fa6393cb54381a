"""Byte-level BPE round trips, token arrays."""

import numpy as np
import pytest

from tokenizer import Tokenizer, prepare_tokens

EN = "The keeper climbed the stairs at dusk and lit the lamp, as she had done for eleven winters.\n"
RU = "Смотритель маяка поднялся по лестнице в сумерках и зажёг лампу, как делал это одиннадцать зим подряд.\n"
PL = "Latarniczka weszła po schodach o zmierzchu i zapaliła lampę, jak co wieczór przez jedenaście zim. Żółć!\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([EN * 30, RU * 30, PL * 30], vocab_size=400)


@pytest.mark.parametrize("text", [EN, RU, PL, "mixed: ёж, żółw, 😀, tabs\tand\r\nCRLF  spaces   "])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes_of(ids) == text.encode("utf-8")


def test_vocab_has_bytes_merges_and_the_special_token(tok):
    assert tok.vocab_size == 400 and tok.eot_id == 0
    assert len(tok.encode(EN)) < len(EN.encode()) / 2  # merges compress the text it was trained on
    assert tok.byte_lengths().sum() > 256


def test_tokenizer_survives_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(RU) == tok.encode(RU) and again.fingerprint() == tok.fingerprint()


def test_token_arrays_split_contiguous_chunks_and_are_cached(tok, tmp_path):
    books = {"en": EN * 200, "pl": PL * 200}
    data = prepare_tokens(tok, books, tmp_path)
    n_train, n_val = len(data["train"]), len(data["val"])
    assert isinstance(data["train"], np.memmap) and data["train"].dtype == np.uint16
    assert 0.07 < n_val / (n_train + n_val) < 0.13
    all_ids = tok.encode(("\n<|endoftext|>\n").join([EN * 200, PL * 200]))
    assert n_train + n_val == len(all_ids)
    mtime = (next(tmp_path.iterdir()) / "train.bin").stat().st_mtime_ns
    prepare_tokens(tok, books, tmp_path)  # the same books again: read from the cache, not re-encoded
    assert (next(tmp_path.iterdir()) / "train.bin").stat().st_mtime_ns == mtime


def test_too_short_book_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="longer text"):
        prepare_tokens(tok, {"tiny": "Hi there."}, tmp_path)


def test_ids_past_the_vocabulary_spell_nothing():
    tok = Tokenizer.train(["a small book, " * 50], 5000)  # far fewer merges than 5000
    assert tok.vocab_size < 5000
    assert tok.token_bytes(4999) == b"" and tok.decode(tok.encode("a small") + [4999]) == "a small"
