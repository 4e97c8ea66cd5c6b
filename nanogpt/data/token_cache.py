"""The encoded-token cache: a corpus's vocabulary and token ids, encoded once and memory-mapped.

The tokens live in ``<cache>/corpus/<what was asked>/<fingerprint>/`` as raw arrays (uint8 when the vocabulary
has at most 256 tokens, uint16 up to 65,536, else uint32) that are memory-mapped, never loaded whole. The fingerprint
covers the source files (path, size, mtime), the dataset fingerprint and every option, so a changed file or
option builds a new entry (replacing the stale one) and anything else is a cache hit. Documents are joined with
``separator``; empty documents are skipped. The tokenizer is characters (one code point, one token: the default),
a byte-level BPE trained on the training source, or a tokenizer.json / hf:NAME; it is part of the key, so
changing it re-encodes and repeating it reuses the entry.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import numpy as np

from nanogpt.data.sources import CHUNK_CHARS, TRAIN_FLAGS, VAL_FLAGS, Advance, Source, cache_root, open_source
from nanogpt.data.vocab import load_vocab
from nanogpt.errors import NanoGPTError
from nanogpt.private import memmap_buffer
from nanogpt.tokenizers.bpe import DEFAULT_BPE_VOCAB_SIZE, SubwordTokenizer, load_subword
from nanogpt.tokenizers.char import CharTokenizer, Tokenizer, describe_chars, tokenizer_from_dict

CACHE_FORMAT = 1  # bump when the layout of a cache entry changes
PROGRESS_MIN_BYTES = 50_000_000  # corpora larger than this get a progress bar
OOV_POLICIES = ("error", "drop", "replace")


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned dtype that holds every token id."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass(frozen=True)
class CorpusConfig:
    """What to read and how to encode it: the data.* options of the same names (TextDataModule takes these).

    Args:
        source: "tinyshakespeare" (downloaded once into the cache), a text file, a directory (files matching glob,
            recursively), a .jsonl/.json/.csv/.parquet file, a save_to_disk dataset folder, or "hf:NAME".
        glob: which files of a directory source to read, recursively.
        text_column: the column holding the text in .jsonl/.json/.csv/.parquet files and datasets.
        hf_config: the dataset configuration for hf:NAME sources (load_dataset's second argument).
        hf_split: the split read from hf:NAME sources and saved dataset dicts.
        separator: put between documents (files, rows); default a blank line.
        val_source: a separate validation corpus (any kind of source); then val_fraction is not used.
        hf_val_split: the split read from val_source when it is hf:NAME or a saved dataset dict.
        tokenizer: "char" (one token per character), "bpe" (a byte-level BPE trained on the training source),
            a tokenizer.json or a folder holding one (e.g. a transformers save_pretrained folder), or "hf:NAME"
            (a Hugging Face model's tokenizer, from the local cache when it is there).
        bpe_vocab_size: tokens of the trained BPE with tokenizer="bpe": 256 bytes plus the merges. 2048 suits a
            corpus of a few MB (tiny-shakespeare: 2.9 bytes per token, and nearly every token seen 20+ times).
        vocab: reuse the tokenizer of a checkpoint, run dir or vocabulary .json (fine-tuning on new text); it
            must be of the kind --data.tokenizer names (characters or subwords).
        oov: characters outside a reused vocabulary: "error" (lists them), "drop", or "replace" (oov_replacement).
        oov_replacement: the character that replaces them with oov="replace" (it must be in the vocabulary).
    """

    source: str = "tinyshakespeare"
    glob: str = "*.txt"
    text_column: str = "text"
    hf_config: Optional[str] = None
    hf_split: str = "train"
    separator: str = "\n\n"
    val_source: Optional[str] = None
    hf_val_split: str = "validation"
    tokenizer: str = "char"
    bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE
    vocab: Optional[str] = None
    oov: Literal["error", "drop", "replace"] = "error"
    oov_replacement: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise NanoGPTError("data.tokenizer is empty; pass char, bpe, a tokenizer.json or folder, or hf:NAME")
        if self.oov not in OOV_POLICIES:
            raise NanoGPTError(f"data.oov must be one of {', '.join(OOV_POLICIES)}, got {self.oov!r}")
        if self.oov == "replace" and (self.oov_replacement is None or len(self.oov_replacement) != 1):
            raise NanoGPTError(
                f"data.oov=replace needs one replacement character, got {self.oov_replacement!r}; "
                "pass e.g. --data.oov_replacement ' '"
            )


@dataclass
class EncodedCorpus:
    """An encoded corpus: its vocabulary and token arrays, memory-mapped from the cache."""

    tokenizer: Tokenizer
    train: np.ndarray  # (N,) token ids of source
    val: Optional[np.ndarray]  # (M,) token ids of val_source, or None
    path: Path  # the cache entry
    from_cache: bool = False
    unknown: Counter = field(default_factory=Counter)  # characters dropped or replaced (oov policy)


class _Progress:
    """A tqdm bar on stderr for corpora over PROGRESS_MIN_BYTES; silent (and free) below."""

    def __init__(self, total: int, desc: str, min_bytes: int) -> None:
        self.bar = None
        if total >= min_bytes:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=0.5)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(max(0, self.bar.total - self.bar.n))
            self.bar.close()


def encode_text(
    chunks: Iterable[str | bytes], tokenizer: Tokenizer, write: Callable[[np.ndarray], Any], oov: str = "error",
    replacement: Optional[str] = None, max_tokens: Optional[int] = None,
) -> tuple[int, Counter]:
    """Encodes a stream of text with the tokenizer's encode_stream, handing the ids (in token_dtype) to write;
    returns how many were written and the characters outside the vocabulary.

    With oov "error" nothing more is written after the first unknown character, but the text is read on to list
    every one with its count; otherwise they were dropped or replaced. max_tokens stops after about that many.
    """
    n, unknown = 0, Counter()
    for ids, bad in tokenizer.encode_stream(chunks, token_dtype(tokenizer.vocab_size), replacement):
        unknown.update(bad)
        if oov == "error" and unknown:
            continue
        write(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    return n, unknown


def _encode_to_file(
    source: Source, tokenizer: Tokenizer, config: CorpusConfig, path: Path, progress: Advance, chunk_chars: int
) -> tuple[int, Counter]:
    """Streams source through the tokenizer into path (raw ids); returns the token count and the unknown chars."""
    replacement = config.oov_replacement if config.oov == "replace" else None
    with open(path, "wb") as f:
        n, unknown = encode_text(source.text(config.separator, progress, chunk_chars), tokenizer,
                                 lambda ids: f.write(memoryview(np.ascontiguousarray(ids))), config.oov, replacement)
        f.flush()
        os.fsync(f.fileno())  # complete on disk before the entry is renamed into place
        if hasattr(os, "posix_fadvise"):
            # drop the freshly written pages from the page cache: they sit in large folios, and a memory map
            # faults in a whole folio (up to MBs) per touched block, which shows up as RSS while training
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return n, unknown


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _open_tokens(path: Path, dtype: str, n: int) -> np.ndarray:
    if path.stat().st_size != n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} has the wrong size")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    mm = memmap_buffer(tokens)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        # batches read blocks at random places: no readahead, so a block costs its own pages, not megabytes
        mm.madvise(mmap.MADV_RANDOM)
    return tokens


def _load_entry(entry: Path, key: str) -> Optional[EncodedCorpus]:
    """A complete cache entry with this key, memory-mapped; None when there is none (or it is damaged)."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        train = _open_tokens(entry / "train.bin", meta["dtype"], meta["train_tokens"])
        val = None
        if meta["val_tokens"] is not None:
            val = _open_tokens(entry / "val.bin", meta["dtype"], meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError, NanoGPTError):
        return None  # missing or damaged: rebuilt by the caller
    unknown = Counter(meta.get("unknown", {}))
    return EncodedCorpus(tokenizer, train, val, entry, from_cache=True, unknown=unknown)


def _remove_stale(base: Path, keep: str, tmp_age_s: float = 86400.0) -> None:
    """Deletes older versions of a corpus (a file or option changed since) and day-old abandoned builds.

    A process still reading a deleted version keeps its memory map: unlinked files live on until unmapped.
    """
    now = time.time()
    for path in base.iterdir():
        if path.name == keep:
            continue
        if path.name.startswith(".tmp-"):
            try:
                if now - path.stat().st_mtime < tmp_age_s:
                    continue  # maybe another process building right now
            except OSError:
                continue
        shutil.rmtree(path, ignore_errors=True)


def build_vocabulary(
    sources: list[Source], config: CorpusConfig, chunk_chars: int = CHUNK_CHARS,
    progress_min_bytes: int = PROGRESS_MIN_BYTES,
) -> CharTokenizer:
    """The vocabulary of the sources' text (the first streaming pass): the characters that occur in it.

    The tokenizer built here is stored in the cache entry (meta.json) and named by its key.
    """
    progress = _Progress(sum(s.size for s in sources), "vocabulary", progress_min_bytes)
    read = Counter()  # characters read, and whether all were: tells an empty corpus from other errors

    def chunks() -> Iterator[str | bytes]:
        for s in sources:
            for chunk in s.text(config.separator, progress, chunk_chars):
                read["chars"] += len(chunk)
                yield chunk
        read["done"] = 1

    try:
        tokenizer = CharTokenizer.from_chunks(chunks())
    except NanoGPTError:
        if read["chars"] or not read["done"]:
            raise
        raise NanoGPTError(f"data source {config.source} is empty; give it some text to train on") from None
    progress.close()
    return tokenizer


def train_bpe(
    source: Source, config: CorpusConfig, chunk_chars: int = CHUNK_CHARS, progress_min_bytes: int = PROGRESS_MIN_BYTES
) -> SubwordTokenizer:
    """A byte-level BPE of config.bpe_vocab_size tokens trained on the training source, read as a stream."""
    progress = _Progress(source.size, "bpe", progress_min_bytes)
    tokenizer = SubwordTokenizer.train(source.text(config.separator, progress, chunk_chars), config.bpe_vocab_size)
    progress.close()
    return tokenizer


def check_tokenizer_kind(config: CorpusConfig, given: Tokenizer) -> None:
    """--data.vocab must hold the kind of tokenizer --data.tokenizer asks for (characters or subwords)."""
    wanted = "char" if config.tokenizer == "char" else "subword"
    if given.kind != wanted:
        raise NanoGPTError(
            f"--data.vocab {config.vocab} holds a {given.kind} tokenizer ({given.describe()}) but --data.tokenizer is "
            f"{config.tokenizer}; pass --data.tokenizer {'char' if given.kind == 'char' else 'bpe'} to reuse it, "
            "or drop --data.vocab"
        )


def _build_entry(
    entry: Path,
    key: str,
    config: CorpusConfig,
    train_src: Source,
    val_src: Optional[Source],
    given: Optional[Tokenizer],
    chunk_chars: int,
    progress_min_bytes: int,
) -> None:
    """Encodes the sources into a temporary folder beside entry, then renames it into place (all or nothing)."""
    sources = [s for s in (train_src, val_src) if s is not None]
    total = sum(s.size for s in sources)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tokenizer = given
        if tokenizer is None and config.tokenizer == "bpe":
            tokenizer = train_bpe(train_src, config, chunk_chars, progress_min_bytes)
        elif tokenizer is None:
            tokenizer = build_vocabulary(sources, config, chunk_chars, progress_min_bytes)
        if config.oov == "replace" and tokenizer.unknown_chars(config.oov_replacement):
            raise NanoGPTError(
                f"--data.oov_replacement {config.oov_replacement!r} is not in the vocabulary; pick a character that is"
            )
        progress = _Progress(total, "encoding", progress_min_bytes)
        n_train, unknown = _encode_to_file(train_src, tokenizer, config, tmp / "train.bin", progress, chunk_chars)
        n_val = None
        if val_src is not None:
            n_val, val_unknown = _encode_to_file(val_src, tokenizer, config, tmp / "val.bin", progress, chunk_chars)
            unknown.update(val_unknown)
        progress.close()
        if unknown and config.oov == "error":
            raise NanoGPTError(
                f"characters outside the vocabulary of {config.vocab}: {describe_chars(unknown)}; "
                "pass --data.oov drop, or --data.oov replace with --data.oov_replacement CHAR"
            )
        if n_train == 0:
            raise NanoGPTError(f"data source {config.source} is empty; give it some text to train on")
        if n_val == 0:
            raise NanoGPTError(f"validation source {config.val_source} is empty; give it some text")
        meta = {
            "key": key,
            "format": CACHE_FORMAT,
            "config": asdict(config),
            "tokenizer": tokenizer.to_dict(),
            "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "unknown": dict(unknown),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if _load_entry(entry, key) is None:  # a damaged leftover of the same name: replace it
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
            else:  # another process (a DDP rank) finished the same entry first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_corpus(
    config: CorpusConfig,
    cache_dir: Optional[str] = None,
    chunk_chars: int = CHUNK_CHARS,
    progress_min_bytes: int = PROGRESS_MIN_BYTES,
) -> EncodedCorpus:
    """The encoded corpus of config, from the cache when nothing changed, else built (two streaming passes).

    The first pass collects the vocabulary (skipped when config.vocab reuses one), the second writes token ids
    into a new cache entry, which becomes visible only once complete: an interrupted build leaves no entry and
    never touches the previous one.
    """
    reading = dict(glob=config.glob, text_column=config.text_column, hf_config=config.hf_config, cache_dir=cache_dir)
    train_src = open_source(config.source, config.hf_split, **reading, flags=TRAIN_FLAGS)
    val_src = open_source(config.val_source, config.hf_val_split, **reading, flags=VAL_FLAGS) if config.val_source else None
    given: Optional[Tokenizer] = None
    if config.vocab:
        given = load_vocab(config.vocab)
        check_tokenizer_kind(config, given)
    elif config.tokenizer not in ("char", "bpe"):
        given = load_subword(config.tokenizer)  # a file or hf:NAME: small, read before the cache lookup
    options = [config.separator, config.oov, config.oov_replacement, config.tokenizer]
    if config.tokenizer == "bpe":
        options.append(config.bpe_vocab_size)
    identity = _key(CACHE_FORMAT, train_src.identity, val_src and val_src.identity, config.vocab, options)
    key = _key(identity, train_src.stamp, val_src and val_src.stamp, given and given.to_dict())
    base = cache_root(cache_dir) / "corpus" / identity[:16]
    entry = base / key[:16]
    cached = _load_entry(entry, key)
    if cached is not None:
        _warn_unknown(cached, config)
        return cached

    try:
        _build_entry(entry, key, config, train_src, val_src, given, chunk_chars, progress_min_bytes)
    except OSError as e:  # reading a source or writing the cache: a full disk, a missing permission
        raise NanoGPTError(
            f"could not encode {config.source} into the cache {base} ({e.strerror or e}: {e.filename}); "
            "check the disk space and permissions, or choose another --data.cache_dir"
        ) from None
    _remove_stale(base, keep=entry.name)
    built = _load_entry(entry, key)
    if built is None:
        raise NanoGPTError(f"the encoded corpus in {entry} cannot be read back; delete it and run again")
    built.from_cache = False
    _warn_unknown(built, config)
    return built


def _warn_unknown(corpus: EncodedCorpus, config: CorpusConfig) -> None:
    """Says which characters the oov policy dropped or replaced (at every run, not only when encoding)."""
    if corpus.unknown:
        action = "dropped" if config.oov == "drop" else f"replaced by {config.oov_replacement!r}"
        warnings.warn(f"characters outside the vocabulary {action}: {describe_chars(corpus.unknown)}", stacklevel=3)
