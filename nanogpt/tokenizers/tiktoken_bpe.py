"""tiktoken as the encoder of GPT-2-style byte-level BPEs: the ids of the `tokenizers` library, about 4x faster.

Encoding a large corpus is the one place where a tokenizer's speed matters (a 2 GB corpus: about 10 minutes with
`tokenizers` on two cores, under 3 with tiktoken). A byte-level BPE with GPT-2's pre-tokenizer (what
`--data.tokenizer bpe` trains, and GPT-2's own tokenizer.json) is the same function as a tiktoken Encoding whose
ranks are the single bytes, then the merges in their order, split by GPT-2's pattern. Any other tokenizer (a
normalizer, another pre-tokenizer, BPE dropout, ...) has no such Encoding here, and `tokenizers` encodes it.

tiktoken joins the adjacent pair whose joined bytes have the lowest rank; `tokenizers` applies the merge rule of
the lowest rank. With the ranks in merge order they choose alike, except where a token could also be made from two
other vocabulary tokens than its merge names (a + bc, for the merge ab + c) and that pair comes up: tiktoken may
join it, `tokenizers` leaves it apart. Either way the ids decode to the same text. On tiny-shakespeare (20 MB tiled)
and on accented, CJK and emoji text the ids are identical; subword_batches checks each corpus's first batch both
ways and keeps to `tokenizers` if they differ.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np

# GPT-2's pre-tokenizer split (ByteLevel with use_regex), as tiktoken's gpt2 encoding writes it
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def _gpt2_style(config: dict[str, Any]) -> bool:
    model, pre = config.get("model") or {}, config.get("pre_tokenizer") or {}
    return (
        model.get("type") == "BPE"
        and config.get("normalizer") is None
        and not any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                           "byte_fallback", "ignore_merges"))
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
    )


class TiktokenBPE:
    """A GPT-2-style byte-level BPE's encoder on tiktoken: encode_batch gives `tokenizers`' ids.

    Built by from_tokenizer_json, which returns None for any tokenizer it cannot stand in for.
    """

    def __init__(self, encoding: Any, rank_to_id: np.ndarray, added: Sequence[str]) -> None:
        self.encoding = encoding
        self.rank_to_id = rank_to_id  # (n_ranks,) the tokenizer's id of each tiktoken rank
        self.added = tuple(added)  # added tokens' text (<|endoftext|>, ...): `tokenizers` matches them in text

    @classmethod
    def from_tokenizer_json(cls, text: str) -> Optional["TiktokenBPE"]:
        try:
            import tiktoken
        except ImportError:  # an install without it: `tokenizers` encodes, as before
            return None
        config = json.loads(text)
        if not _gpt2_style(config):
            return None
        model, byte_of = config["model"], byte_of_char()
        added = [t["content"] for t in config.get("added_tokens", [])]
        try:
            ranks = {bytes([b]): b for b in range(256)}
            for merge in model["merges"]:
                left, right = merge if isinstance(merge, list) else merge.split(" ")
                merged = bytes(byte_of[c] for c in left + right)
                if merged in ranks:
                    return None  # a token two merges make: tiktoken's merge order could not tell them apart
                ranks[merged] = len(ranks)
            rank_to_id = np.full(len(ranks), -1, dtype=np.int64)
            for token, token_id in model["vocab"].items():
                if token in added:
                    continue  # GPT-2 keeps <|endoftext|> in the model's vocabulary too; handles() routes it
                rank_to_id[ranks[bytes(byte_of[c] for c in token)]] = token_id
        except (KeyError, ValueError):  # a character outside the byte alphabet, a token no merge makes
            return None
        if (rank_to_id < 0).any():
            return None  # a byte or merge without a vocabulary entry
        encoding = tiktoken.Encoding("nanogpt-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
        return cls(encoding, rank_to_id, added)

    def handles(self, texts: Sequence[str]) -> bool:
        """False when an added token's text appears in texts (`tokenizers` gives it its own id; tiktoken would not)."""
        return not any(token in text for token in self.added for text in texts)

    def encode_batch(self, texts: Sequence[str], dtype: Any = np.int64) -> np.ndarray:
        """The ids of texts, concatenated in order, (n_tokens,); the texts are encoded on all cores."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # tiktoken releases the GIL
            ranks = list(pool.map(self.encoding.encode_to_numpy, texts))
        if not ranks:
            return np.zeros(0, dtype=dtype)
        return self.rank_to_id[np.concatenate(ranks)].astype(dtype, copy=False)
