"""Character-level tokenizer: one token per Unicode code point of the training corpus."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from nanogpt.errors import NanoGPTError


def _codepoints(text: str) -> np.ndarray:
    """The text's Unicode code points as a (len(text),) uint32 array, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharTokenizer:
    """Maps each character of a fixed, sorted vocabulary to its index."""

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise NanoGPTError("the vocabulary is empty: the training text has no characters")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise NanoGPTError("a character vocabulary must be distinct single characters")
        self.chars = sorted(chars)
        # sorted code points, so encoding is a binary search per character (np.searchsorted)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary is the sorted set of characters that occur in text."""
        return cls([chr(c) for c in np.unique(_codepoints(text))])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("chars"), list):
            raise NanoGPTError("the stored tokenizer is not a character vocabulary: {'type': 'char', 'chars': [...]}")
        return cls(d["chars"])

    def to_dict(self) -> dict[str, Any]:
        """A plain-data form (only str and list) that is stored inside every checkpoint."""
        return {"type": "char", "chars": list(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def unknown_chars(self, text: str) -> Counter:
        """Characters of text that are not in the vocabulary, with their counts."""
        codes = _codepoints(text)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        bad = codes[self._codes[pos] != codes]
        values, counts = np.unique(bad, return_counts=True)
        return Counter({chr(v): int(n) for v, n in zip(values, counts)})

    def encode(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """Token ids of text as a (len(text),) array; a character outside the vocabulary is an error."""
        codes = _codepoints(text)
        pos = np.searchsorted(self._codes, codes)
        pos_c = np.minimum(pos, len(self._codes) - 1)
        if not np.array_equal(self._codes[pos_c], codes):
            raise NanoGPTError(
                f"characters not in the model's vocabulary: {describe_chars(self.unknown_chars(text))}; "
                "remove them from the text (the vocabulary is the training corpus's characters)"
            )
        return pos.astype(dtype, copy=False)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise NanoGPTError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le")


def describe_chars(counts: Counter, limit: int = 20) -> str:
    """A short readable list of characters with counts, e.g. "'é' (3), '\\t' (1)"."""
    items = [f"{c!r} ({n})" for c, n in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")
