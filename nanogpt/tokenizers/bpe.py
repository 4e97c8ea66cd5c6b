"""Subword tokenizers from the Hugging Face `tokenizers` library: trained on the corpus or loaded from files.

A byte-level BPE (GPT-2's scheme) is trained from a stream of text chunks, or any `tokenizer.json` is loaded:
a file, a folder holding one (a transformers `save_pretrained` folder such as GPT-2's), or `hf:NAME` from
the Hugging Face cache. The whole tokenizer.json text travels in every checkpoint, so a model never needs
the original files again.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from nanogpt.errors import NanoGPTError, first_line
from nanogpt.hub import hub_folder
from nanogpt.tokenizers.tiktoken_bpe import TiktokenBPE

# 2048 suits a corpus of a few MB: on tiny-shakespeare (1.1 MB) it gives 2.9 bytes per token (characters: 1.0),
# so a 256-token context spans about 740 characters, and nearly every merge still occurs 20+ times, so its
# embedding is trained; at 4096 about 1,700 tokens occur fewer than 20 times and the text shrinks only 11% more
DEFAULT_BPE_VOCAB_SIZE = 2048
BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte value
ENCODE_PIECE_CHARS = 1 << 16  # text per encode_batch item: many items per batch keep every core busy
TRAIN_PIECE_CHARS = 1 << 16  # text per sequence handed to the BPE trainer
ENCODE_BATCH_CHARS = 1 << 22  # text handed to the subword tokenizer's encode_batch at once (all cores share it)


def _tokenizers() -> Any:
    import tokenizers  # imported when first used: `import nanogpt` stays light

    return tokenizers


class SubwordTokenizer:
    """A `tokenizers.Tokenizer` behind the same interface as CharTokenizer (encode, decode, to_dict, ...)."""

    kind = "subword"
    unit = "tokens"

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer = tokenizer
        self.source = source  # how it was made: "bpe:2048" (trained), a path, or "hf:NAME"
        self._json = tokenizer.to_str()  # over 1 MB for GPT-2's: serialised once
        spec = json.loads(self._json)
        # byte-level: every token is a string of byte symbols, so any text encodes and each token has a byte length
        self.byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        self._added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if self._vocab_size < 1:
            raise NanoGPTError(f"the tokenizer from {source} has an empty vocabulary")

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def train(cls, chunks: Iterable[str | bytes], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> "SubwordTokenizer":
        """A byte-level BPE with vocab_size tokens (256 byte tokens + merges) trained on a stream of text chunks.

        The trainer holds counts of distinct pre-tokens (words), not the text, so memory stays bounded.
        """
        tk = _tokenizers()
        if not isinstance(vocab_size, int) or vocab_size < BYTE_ALPHABET:
            raise NanoGPTError(
                f"--data.bpe_vocab_size {vocab_size} is too small: a byte-level BPE needs the {BYTE_ALPHABET} "
                f"byte tokens plus its merges; pick at least {BYTE_ALPHABET} (default {DEFAULT_BPE_VOCAB_SIZE})"
            )
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split into words
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,  # a pair seen once saves nothing
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        # small pieces: the trainer splits each sequence into words at once, about 100 bytes per word in flight
        tok.train_from_iterator(encoding_pieces(chunks, TRAIN_PIECE_CHARS), trainer)
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            raise NanoGPTError(
                f"--data.bpe_vocab_size {vocab_size} asks for more merges than the corpus gives: it yields only "
                f"{got} tokens ({got - BYTE_ALPHABET} merges of pairs seen at least twice); pick at most {got}"
            )
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def from_json(cls, text: str, source: str) -> "SubwordTokenizer":
        try:
            tok = _tokenizers().Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception on any malformed file
            raise NanoGPTError(
                f"{source} is not a Hugging Face tokenizer.json ({first_line(e)}); pass a tokenizer.json, "
                "a folder holding one, or hf:NAME"
            ) from None
        return cls(tok, source)

    @classmethod
    def from_path(cls, path: str) -> "SubwordTokenizer":
        """A tokenizer.json file, or a folder holding one (e.g. a transformers save_pretrained folder)."""
        p = Path(path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if p.is_dir() and not file.is_file():
            raise NanoGPTError(
                f"--data.tokenizer {path} is a folder without a tokenizer.json; pass a folder written by "
                "transformers' save_pretrained with a fast tokenizer, or the tokenizer.json itself"
            )
        if not file.is_file():
            raise NanoGPTError(
                f"--data.tokenizer {path!r} is not char, bpe, hf:NAME or an existing tokenizer.json or folder"
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NanoGPTError(f"{file} is not a readable tokenizer.json ({first_line(e)})") from None
        return cls.from_json(text, str(file.resolve()))

    @classmethod
    def from_hub(cls, name: str) -> "SubwordTokenizer":
        """The tokenizer.json of Hugging Face model NAME: from the local cache first, so it works offline."""
        if not name:
            raise NanoGPTError("--data.tokenizer hf: needs a model name, e.g. hf:gpt2")
        file = hub_folder(name, ["tokenizer.json"], "tokenizer.json") / "tokenizer.json"
        return cls.from_json(file.read_text(encoding="utf-8"), f"hf:{name}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubwordTokenizer":
        if not isinstance(d, dict) or d.get("type") != cls.kind or not isinstance(d.get("json"), str):
            raise NanoGPTError("the stored tokenizer is not a subword tokenizer: {'type': 'subword', 'json': ...}")
        return cls.from_json(d["json"], str(d.get("source", "a checkpoint")))

    def to_dict(self) -> dict[str, Any]:
        """Plain data stored inside every checkpoint: the full tokenizer.json text."""
        return {"type": self.kind, "source": self.source, "json": self._json}

    # ------------------------------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self._json == other._json

    def __repr__(self) -> str:
        return f"SubwordTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    def describe(self) -> str:
        return f"{self.source} ({self.vocab_size} tokens)"

    def encode(self, text: str | bytes, dtype: Any = np.int64) -> np.ndarray:
        """Token ids of text, (n_tokens,). Special tokens (BOS, CLS, ...) are never added."""
        return self.encode_batch([text], dtype)

    def encode_batch(self, texts: Sequence[str | bytes], dtype: Any = np.int64) -> np.ndarray:
        """The ids of texts, concatenated in order; the Rust tokenizer encodes them in parallel on all cores."""
        return self.ids_array(self.encodings(texts), dtype)

    def fast_encoder(self) -> Optional[TiktokenBPE]:
        """tiktoken standing in for this tokenizer when encoding a corpus, or None (see fast_bpe); built once."""
        if not hasattr(self, "_fast"):
            self._fast = TiktokenBPE.from_tokenizer_json(self._json)
        return self._fast

    def encodings(self, texts: Sequence[str | bytes]) -> list[Any]:
        """The Rust tokenizer's Encoding of each text, encoded in parallel on all cores (without holding the GIL)."""
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        return self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster

    @staticmethod
    def ids_array(encodings: Sequence[Any], dtype: Any = np.int64) -> np.ndarray:
        """The ids of encodings, concatenated in order, (n_tokens,)."""
        parts = [np.asarray(e.ids, dtype=dtype) for e in encodings]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def encode_known(
        self, text: str | bytes, dtype: Any = np.int64, replacement: Optional[str] = None
    ) -> tuple[np.ndarray, Counter]:
        """encode, with CharTokenizer's signature: a byte-level BPE has no unknown characters."""
        return self.encode(text, dtype), Counter()

    def encode_stream(
        self, chunks: Iterable[str | bytes], dtype: Any, replacement: Optional[str] = None
    ) -> Iterator[tuple[np.ndarray, Counter]]:
        """The ids of a stream of text chunks, a batch at a time (see subword_batches: the ids of the whole text,
        by tiktoken where it gives the same ids); nothing is unknown to a byte-level BPE, so replacement is unused."""
        return ((ids, Counter()) for ids in subword_batches(chunks, self, dtype))

    def unknown_chars(self, text: str) -> Counter:
        """Characters the tokenizer maps to its unknown token (none for a byte-level BPE)."""
        unk = self._unk_id()
        if unk is None:
            return Counter()
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return Counter(text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk)

    def _unk_id(self) -> Optional[int]:
        token = json.loads(self._json)["model"].get("unk_token")
        return None if token is None else self.tokenizer.token_to_id(token)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise NanoGPTError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer, prompt_ids)

    def token_bytes(self) -> Optional[np.ndarray]:
        """UTF-8 bytes each token stands for, (vocab_size,) int64, for bits per byte; None if not byte-level.

        A byte-level token is a string of byte symbols, one character per byte; an added token (e.g.
        <|endoftext|>) matched in text stands for its own text.
        """
        if not self.byte_level:
            return None
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            out[i] = len(self._added[i].encode("utf-8")) if i in self._added else len(token)
        return out


def load_subword(spec: str) -> SubwordTokenizer:
    """The tokenizer named by spec: "hf:NAME" from the Hugging Face cache, else a tokenizer.json or a folder."""
    if spec.startswith("hf:"):
        return SubwordTokenizer.from_hub(spec[3:])
    return SubwordTokenizer.from_path(spec)


class StreamDecoder:
    """Turns generated ids into text one token at a time, never yielding half a multi-byte character.

    A byte-level token may end inside a character (an emoji is 4 bytes, often 2+ tokens): its text is held
    back until the bytes complete it. The prompt's ids give the decoder its context (e.g. leading spaces).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stream = _tokenizers().decoders.DecodeStream(skip_special_tokens=False)
        for i in prompt_ids:
            self._stream.step(tokenizer, int(i))

    def step(self, token_id: int) -> str:
        """The text that token_id completes (often '' while a character is still partial)."""
        return self._stream.step(self._tokenizer, int(token_id)) or ""


# a cut here keeps GPT-2-style pre-tokenization unchanged: a newline, then a character that starts a new word
_SAFE_CUT = re.compile(r"\n(?=\S)")


def encoding_pieces(chunks: Iterable[str | bytes], piece_chars: int = ENCODE_PIECE_CHARS) -> Iterator[str]:
    """Regroups text chunks into pieces of at most about piece_chars, cut only after a newline followed by a
    non-space character.

    Encoding the pieces separately then gives the ids of the whole text: GPT-2's pre-tokenization never puts
    such a newline and the next word in one pre-token, and BPE never merges across pre-tokens. A stretch of
    piece_chars with no such newline (after its first half) is cut at piece_chars anyway.
    """
    buf = ""
    for chunk in chunks:
        buf += chunk.decode("utf-8") if isinstance(chunk, bytes) else chunk
        start = 0
        while len(buf) - start > piece_chars:  # > not >=: the character after a cut must be known
            end = _last_safe_cut(buf, start + piece_chars // 2, start + piece_chars)
            yield buf[start:end]
            start = end
        buf = buf[start:]
    if buf:
        yield buf


def _last_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last p in (lo, hi] with text[p - 1] == '\\n' and text[p] not whitespace, else hi."""
    end = hi
    while (nl := text.rfind("\n", lo, end)) >= 0:
        if _SAFE_CUT.match(text, nl):
            return nl + 1
        end = nl
    return hi


def _text_batches(chunks: Iterator[str | bytes]) -> Iterator[list[str]]:
    """Pieces of the stream cut where the ids stay those of the whole text (see encoding_pieces), grouped into
    batches of about ENCODE_BATCH_CHARS."""
    batch: list[str] = []
    size = 0
    for piece in encoding_pieces(chunks):
        batch.append(piece)
        size += len(piece)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def subword_batches(chunks: Iterator[str | bytes], tokenizer: SubwordTokenizer, dtype: Any) -> Iterator[np.ndarray]:
    """The ids of a stream of text, one array per batch of about ENCODE_BATCH_CHARS, in order.

    A GPT-2-style byte-level BPE is encoded by tiktoken (fast_bpe.TiktokenBPE: the same ids, about 4x faster),
    after a check that both give the same ids on the start of the first batch it takes; any other tokenizer, a
    batch holding an added token's text, or a failed check is encoded by `tokenizers`. Either runs on all cores in a worker
    thread while this thread converts, writes and cuts the batch before: at most two batches are in flight.
    """
    fast = tokenizer.fast_encoder()
    checked = False
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanogpt-encode") as pool:
        pending: Optional[Future] = None
        for batch in _text_batches(chunks):
            if fast is not None and not checked and fast.handles(batch):  # the first batch tiktoken would take
                checked = True
                probe = batch[:1]  # one 64K-character piece: a cheap check in `tokenizers`' time
                if not np.array_equal(fast.encode_batch(probe), tokenizer.encode_batch(probe)):
                    warnings.warn(f"tiktoken's ids differ from the tokenizer's on this corpus ({tokenizer.source}); "
                                  "encoding it with `tokenizers` instead (slower, the same ids as sampling uses)")
                    fast = None
            if fast is not None and fast.handles(batch):
                submitted = pool.submit(fast.encode_batch, batch, dtype)
            else:
                submitted = pool.submit(tokenizer.encodings, batch)
            if pending is not None:
                yield _as_ids(pending.result(), dtype)
            pending = submitted
        if pending is not None:
            yield _as_ids(pending.result(), dtype)


def _as_ids(result: Any, dtype: Any) -> np.ndarray:
    """A worker's result as ids: tiktoken's array already, or `tokenizers`' Encodings converted here."""
    return result if isinstance(result, np.ndarray) else SubwordTokenizer.ids_array(result, dtype)
