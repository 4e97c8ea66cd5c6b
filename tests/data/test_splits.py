"""The training and validation splits (data/splits.py): sized in the tokenizer's own unit, read without Lightning."""

from pathlib import Path

import numpy as np
import pytest

from nanogpt.data.splits import split_tokens
from nanogpt.data.token_cache import CorpusConfig, EncodedCorpus
from nanogpt.errors import NanoGPTError
from nanogpt.tokenizers.bpe import SubwordTokenizer
from nanogpt.tokenizers.char import CharTokenizer


def corpus(tokenizer, n_train: int, n_val=None) -> EncodedCorpus:
    val = None if n_val is None else np.zeros(n_val, dtype=np.uint16)
    return EncodedCorpus(tokenizer, np.zeros(n_train, dtype=np.uint16), val, Path("."))


def test_a_split_too_short_for_a_block_is_counted_in_the_tokenizers_unit(shakespeare_text):
    chars = CharTokenizer.from_text("ab")
    bpe = SubwordTokenizer.train([shakespeare_text[:20000]], 300)
    config = CorpusConfig(source="short.txt", val_source="val.txt")
    with pytest.raises(NanoGPTError, match=r"data source short.txt has 20 characters, fewer than block_size\+1 = 33"):
        split_tokens(corpus(chars, 20), config, 0.1, 32)
    with pytest.raises(NanoGPTError, match=r"data source short.txt has 20 tokens, fewer than block_size\+1 = 33"):
        split_tokens(corpus(bpe, 20), config, 0.1, 32)
    with pytest.raises(NanoGPTError, match=r"validation source val.txt has 5 tokens"):
        split_tokens(corpus(bpe, 100, 5), config, 0.1, 32)
    with pytest.raises(NanoGPTError, match=r"validation split has 10 tokens \(val_fraction=0.1\)"):
        split_tokens(corpus(bpe, 100), CorpusConfig(), 0.1, 32)
    train, val = split_tokens(corpus(bpe, 400), CorpusConfig(), 0.1, 32)  # the held-out end
    assert (len(train), len(val)) == (360, 40)
    train, val = split_tokens(corpus(bpe, 400, 50), config, 0.1, 32)  # a validation source of its own
    assert (len(train), len(val)) == (400, 50)
