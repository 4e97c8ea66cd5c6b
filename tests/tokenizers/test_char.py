import numpy as np
import pytest

from nanogpt.errors import NanoGPTError
from nanogpt.tokenizers.char import CharTokenizer


def test_vocabulary_is_sorted_unique_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8


def test_round_trip_with_unicode():
    text = "Hé llo, wörld! 😀 中文\r\nline two\n"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.shape == (len(text),)
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_encode_matches_index_in_vocabulary(shakespeare_text):
    text = shakespeare_text[:5000]
    tok = CharTokenizer.from_text(shakespeare_text)
    expected = [tok.chars.index(c) for c in text]
    assert tok.encode(text).tolist() == expected
    assert tok.encode(text, dtype=np.uint8).dtype == np.uint8


def test_shakespeare_has_65_characters(shakespeare_text):
    assert CharTokenizer.from_text(shakespeare_text).vocab_size == 65


def test_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(NanoGPTError) as e:
        tok.encode("abxxzé")
    message = str(e.value)
    assert "'x' (2)" in message and "'z' (1)" in message and "'é' (1)" in message
    assert "\n" not in message


def test_dict_form_is_plain_data_and_round_trips():
    tok = CharTokenizer.from_text("the quick brown fox")
    d = tok.to_dict()
    assert d["type"] == "char" and all(isinstance(c, str) for c in d["chars"])
    assert CharTokenizer.from_dict(d) == tok
    with pytest.raises(NanoGPTError):
        CharTokenizer.from_dict({"type": "bpe"})


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(NanoGPTError):
        tok.decode([0, 2])
