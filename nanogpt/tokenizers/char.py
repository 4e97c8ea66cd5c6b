"""Tokenizers: the character-level one (one token per Unicode code point of the corpus, the default) and the
interface it shares with the subword tokenizers of nanogpt.tokenizers.bpe."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from nanogpt.errors import NanoGPTError


def _codepoints(text: str) -> np.ndarray:
    """The text's Unicode code points as a (len(text),) uint32 array, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _ascii_bytes(text: str | bytes) -> Optional[bytes]:
    """The text as bytes when it is all ASCII (one byte per character), else None.

    Text may be a str or its UTF-8 bytes: the corpus reader hands ASCII chunks on undecoded, which saves a
    decode and an encode per chunk.
    """
    if isinstance(text, bytes):
        return text if text.isascii() else None
    return text.encode("ascii") if text.isascii() else None  # str.isascii() is O(1) in CPython


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


UNICODE_SIZE = 0x110000  # code points 0..U+10FFFF
_UNKNOWN_BYTE = 0xFF  # marks an unknown ASCII character after bytes.translate: ASCII ids are always < 128


class StreamDecoding(Protocol):
    def step(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    """What the data, training, sampling and export layers use of a tokenizer (char or subword)."""

    kind: str  # "char" or "subword": the "type" of its to_dict()
    unit: str  # what a token is called in messages: "characters" or "tokens"

    @property
    def vocab_size(self) -> int: ...
    def describe(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def encode(self, text: str, dtype: Any = np.int64) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str | bytes], dtype: Any = np.int64) -> np.ndarray: ...
    def encode_known(
        self, text: str | bytes, dtype: Any = np.int64, replacement: Optional[str] = None
    ) -> tuple[np.ndarray, Counter]: ...
    def encode_stream(
        self, chunks: Iterable[str | bytes], dtype: Any, replacement: Optional[str] = None
    ) -> Iterator[tuple[np.ndarray, Counter]]: ...
    def unknown_chars(self, text: str) -> Counter: ...
    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...
    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> StreamDecoding: ...
    def token_bytes(self) -> Optional[np.ndarray]: ...


def tokenizer_from_dict(d: Any) -> Tokenizer:
    """The tokenizer stored in a checkpoint or cache entry (its to_dict() form), of whichever kind."""
    if isinstance(d, dict) and d.get("type") == "subword":
        from nanogpt.tokenizers.bpe import SubwordTokenizer  # the `tokenizers` library only when a model uses it

        return SubwordTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)


def byte_length(text: str | bytes) -> int:
    """Length of text in UTF-8 bytes: the denominator of bits per byte."""
    return len(text) if isinstance(text, bytes) else len(text.encode("utf-8"))


class CharTokenizer:
    """Maps each character of a fixed, sorted vocabulary to its index."""

    kind = "char"
    unit = "characters"

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise NanoGPTError("the vocabulary is empty: the training text has no characters")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise NanoGPTError("a character vocabulary must be distinct single characters")
        self.chars = sorted(chars)
        # sorted code points: a character's id is its position (encoding builds lookup tables from these)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._byte_table: Optional[bytes] = None
        self._code_table: Optional[np.ndarray] = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary is the sorted set of characters that occur in text."""
        return cls.from_chunks([text])

    @classmethod
    def from_chunks(cls, chunks: Iterable[str | bytes]) -> "CharTokenizer":
        """The sorted set of characters in a stream of text chunks (str or UTF-8 bytes), holding one at a time."""
        ascii_seen = b""  # the ASCII characters found so far, as bytes
        seen = None  # (UNICODE_SIZE,) bool, allocated at the first non-ASCII chunk
        for chunk in chunks:
            raw = _ascii_bytes(chunk)
            if raw is not None:  # the common case takes C-speed bytes paths only
                new = raw.translate(None, ascii_seen)  # drops every character already seen
                if new:
                    ascii_seen = np.union1d(np.frombuffer(ascii_seen, np.uint8), np.frombuffer(new, np.uint8)).tobytes()
            else:
                if seen is None:
                    seen = np.zeros(UNICODE_SIZE, dtype=bool)
                seen[_codepoints(_as_str(chunk))] = True
        codes = np.frombuffer(ascii_seen, np.uint8).astype(np.int64)
        if seen is not None:
            codes = np.union1d(codes, np.flatnonzero(seen))
        return cls([chr(c) for c in codes])

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

    def describe(self) -> str:
        return f"char ({self.vocab_size} characters)"

    def unknown_chars(self, text: str) -> Counter:
        """Characters of text that are not in the vocabulary, with their counts."""
        codes = _codepoints(text)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        bad = codes[self._codes[pos] != codes]
        values, counts = np.unique(bad, return_counts=True)
        return Counter({chr(v): int(n) for v, n in zip(values, counts)})

    def encode(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """Token ids of text as a (len(text),) array; a character outside the vocabulary is an error."""
        ids, unknown = self.encode_known(text, dtype)
        if unknown:
            raise NanoGPTError(
                f"characters not in the model's vocabulary: {describe_chars(unknown)}; "
                "remove them from the text (the vocabulary is the training corpus's characters)"
            )
        return ids

    def encode_known(
        self, text: str | bytes, dtype: Any = np.int64, replacement: Optional[str] = None
    ) -> tuple[np.ndarray, Counter]:
        """Token ids of text, with characters outside the vocabulary dropped (or replaced by replacement).

        Returns the ids, (len(text) - dropped,), and the unknown characters with their counts. Vectorised: a
        bytes.translate table for ASCII text, a dense code point -> id table for the rest. text may also be
        UTF-8 bytes.
        """
        if replacement is not None and replacement not in self.chars:
            raise NanoGPTError(f"the replacement character {replacement!r} is not in the vocabulary; pick one that is")
        raw = _ascii_bytes(text)
        if raw is not None:
            mapped = raw.translate(self._ascii_table())  # one id byte per character (ASCII ids are < 128)
            ids = np.frombuffer(mapped, dtype=np.uint8)
            if _UNKNOWN_BYTE not in mapped:  # a memchr: the fast path costs two passes over the bytes
                return ids.astype(dtype, copy=False), Counter()
            codes, unknown_mask = np.frombuffer(raw, dtype=np.uint8), ids == _UNKNOWN_BYTE
        else:
            codes = _codepoints(_as_str(text))
            ids = self._unicode_table()[codes]  # (len(text),) int32, -1 for unknown characters
            unknown_mask = ids < 0
            if not unknown_mask.any():
                return ids.astype(dtype, copy=False), Counter()
        values, counts = np.unique(codes[unknown_mask], return_counts=True)
        unknown = Counter({chr(v): int(n) for v, n in zip(values, counts)})
        if replacement is None:
            ids = ids[~unknown_mask]
        else:
            ids = ids.copy()
            ids[unknown_mask] = self.chars.index(replacement)
        return ids.astype(dtype, copy=False), unknown

    def encode_stream(
        self, chunks: Iterable[str | bytes], dtype: Any, replacement: Optional[str] = None
    ) -> Iterator[tuple[np.ndarray, Counter]]:
        """The ids of a stream of text chunks, chunk by chunk, each with the characters outside the vocabulary
        (dropped, or replaced by replacement): the one way a corpus or an evaluated text is encoded."""
        return (self.encode_known(chunk, dtype, replacement) for chunk in chunks)

    def _ascii_table(self) -> bytes:
        """A 256-byte bytes.translate table: ASCII byte -> its id, anything unknown -> _UNKNOWN_BYTE."""
        if self._byte_table is None:
            table = bytearray([_UNKNOWN_BYTE]) * 256
            for i, c in enumerate(self.chars):
                if ord(c) < 128:
                    table[ord(c)] = i
            self._byte_table = bytes(table)
        return self._byte_table

    def _unicode_table(self) -> np.ndarray:
        """A dense (UNICODE_SIZE,) int32 table: code point -> id, -1 outside the vocabulary (4.4 MB, built once)."""
        if self._code_table is None:
            table = np.full(UNICODE_SIZE, -1, dtype=np.int32)
            table[self._codes] = np.arange(len(self._codes), dtype=np.int32)
            self._code_table = table
        return self._code_table

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise NanoGPTError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le")

    def encode_batch(self, texts: Sequence[str | bytes], dtype: Any = np.int64) -> np.ndarray:
        """The ids of texts, concatenated (each character one token, so chunking never changes them)."""
        parts = [self.encode(t.decode("utf-8") if isinstance(t, bytes) else t, dtype) for t in texts]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> "CharStreamDecoder":
        return CharStreamDecoder(self)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each character, (vocab_size,) int64, for bits per byte."""
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)


class CharStreamDecoder:
    """Every character token is a whole character: decoding one at a time is exact."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self._tokenizer = tokenizer

    def step(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


def describe_chars(counts: Counter, limit: int = 20) -> str:
    """A short readable list of characters with counts, e.g. "'é' (3), '\\t' (1)"."""
    items = [f"{c!r} ({n})" for c, n in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")
