"""The training and validation splits of an encoded corpus, checked against the block size, and the validation
blocks of a run: what the DataModule serves and what `nanogpt-eval --split val` scores, without Lightning."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

import numpy as np

from nanogpt.data.blocks import val_block_starts
from nanogpt.data.token_cache import CorpusConfig, EncodedCorpus, prepare_corpus
from nanogpt.errors import NanoGPTError

# the defaults of data.val_fraction and data.val_blocks (the DataModule's arguments of those names)
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_BLOCKS = 256


def split_tokens(corpus: EncodedCorpus, config: CorpusConfig, val_fraction: float,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation tokens (views): the end of the corpus, or its val_source when it has one.

    Each split must hold at least one block (block_size + 1 tokens); an error says which does not and what to do.
    """
    tokens, unit = corpus.train, corpus.tokenizer.unit
    n_val = 0 if corpus.val is not None else int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    need = block_size + 1
    if len(tokens) < need:
        raise NanoGPTError(
            f"data source {config.source} has {len(tokens)} {unit}, fewer than block_size+1 = {need}; "
            "use more text or a smaller --model.block_size"
        )
    if n_train < need:
        raise NanoGPTError(
            f"the training split has {n_train} {unit}, fewer than block_size+1 = {need}; "
            "lower --data.val_fraction or --model.block_size, or use more text"
        )
    if corpus.val is not None and len(corpus.val) < need:
        raise NanoGPTError(
            f"the validation source {config.val_source} has {len(corpus.val)} {unit}, "
            f"fewer than block_size+1 = {need}; use more validation text or a smaller --model.block_size"
        )
    if corpus.val is None and n_val < need:
        raise NanoGPTError(
            f"the validation split has {n_val} {unit} (val_fraction={val_fraction}), fewer than "
            f"block_size+1 = {need}; raise --data.val_fraction or lower --model.block_size, or use more text"
        )
    return tokens[:n_train], (tokens[n_train:] if corpus.val is None else corpus.val)


def run_validation_blocks(data: dict[str, Any], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation tokens of a run with these data.* settings (its config.yaml's data section), and the starts
    of the fixed blocks its val/loss is computed on."""
    corpus_fields = {f.name for f in fields(CorpusConfig)}
    config = CorpusConfig(**{k: v for k, v in data.items() if k in corpus_fields})
    cache_dir: Optional[str] = data.get("cache_dir")
    val_fraction = data.get("val_fraction", DEFAULT_VAL_FRACTION)
    _, val = split_tokens(prepare_corpus(config, cache_dir), config, val_fraction, block_size)
    return val, val_block_starts(len(val), block_size, data.get("val_blocks", DEFAULT_VAL_BLOCKS))
