"""Corpora: read text from any source, build its vocabulary and encode it once into a memory-mapped cache.

Sources (``--data.source`` / ``--data.val_source``):
  * ``tinyshakespeare``: downloaded once into the cache and checked against its sha256;
  * a text file (UTF-8, read in chunks: a file may be larger than memory);
  * a directory: every file matching ``glob`` below it, recursively, in sorted order, each read by its suffix;
  * ``.jsonl``, ``.json``, ``.csv`` and ``.parquet`` files: one document per row, from column ``text_column``;
  * a folder written by ``datasets``' ``save_to_disk`` (detected), or ``hf:NAME``, loaded with
    ``datasets.load_dataset(NAME, hf_config, split=hf_split)``.
Documents are joined with ``separator``; empty documents are skipped. Text is kept exactly as it is: CRLF stays
CRLF, combining characters stay separate code points (no Unicode normalisation); one code point is one token.

The encoded tokens live in ``<cache>/corpus/<what was asked>/<fingerprint>/`` as raw arrays (uint8 when the
vocabulary has at most 256 characters, else uint16/uint32) that are memory-mapped, never loaded whole. The
fingerprint covers the source files (path, size, mtime), the dataset fingerprint and every option, so a changed
file or option builds a new entry (replacing the stale one) and anything else is a cache hit.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from nanogpt.checkpoint import atomic_write, resolve_checkpoint
from nanogpt.errors import NanoGPTError
from nanogpt.tokenizer import CharTokenizer, describe_chars

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

CACHE_FORMAT = 1  # bump when the layout of a cache entry changes
CHUNK_CHARS = 1 << 22  # text is read and encoded in pieces of about 4M characters: memory stays bounded
PROGRESS_MIN_BYTES = 50_000_000  # corpora larger than this get a progress bar
TABULAR_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
OOV_POLICIES = ("error", "drop", "replace")

Advance = Callable[[int], None]  # told how many source bytes were consumed, for the progress bar


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where downloads and encoded corpora live: cache_dir, else $NANOGPT_CACHE, else ~/.cache/nanogpt."""
    return Path(cache_dir or os.environ.get("NANOGPT_CACHE") or Path.home() / ".cache" / "nanogpt").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tinyshakespeare_path(cache_dir: Optional[str] = None) -> Path:
    return cache_root(cache_dir) / "tinyshakespeare" / "input.txt"


def download_tinyshakespeare(cache_dir: Optional[str] = None) -> Path:
    """Makes sure the verified tiny-shakespeare corpus is in the cache; downloads it once if it is not."""
    path = tinyshakespeare_path(cache_dir)
    if path.is_file() and _sha256(path.read_bytes()) == TINYSHAKESPEARE_SHA256:
        return path
    url = os.environ.get("NANOGPT_TINYSHAKESPEARE_URL", TINYSHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise NanoGPTError(
            f"could not download tiny-shakespeare from {url} ({getattr(e, 'reason', e)}); without a network, "
            f"copy the file to {path} or train on a local file with --data.source PATH"
        ) from None
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        raise NanoGPTError(
            f"the tiny-shakespeare download from {url} failed its sha256 check ({_sha256(data)[:12]}… "
            f"instead of {TINYSHAKESPEARE_SHA256[:12]}…); try again, or pass a local file with --data.source PATH"
        )
    atomic_write(path, lambda f: f.write(data))
    return path


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned dtype that holds every token id."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass(frozen=True)
class CorpusConfig:
    """What to read and how to encode it (CharDataModule's data.* options of the same names).

    Args:
        source: "tinyshakespeare", a file, a directory, a save_to_disk folder or "hf:NAME".
        glob: which files of a directory source to read (recursively).
        text_column: the column that holds the text in .jsonl/.json/.csv/.parquet files and datasets.
        hf_config: the dataset configuration (load_dataset's second argument) for hf: sources.
        hf_split: the split read from hf: sources and save_to_disk dataset dicts.
        separator: put between documents (files, rows).
        val_source: a separate validation corpus (any kind of source); None splits source by position.
        hf_val_split: the split read from val_source when it is an hf: source or a save_to_disk dataset dict.
        vocab: reuse the vocabulary of a checkpoint, run dir or vocabulary .json instead of building one.
        oov: what to do with characters outside a reused vocabulary: "error" (lists them), "drop" or "replace".
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
    vocab: Optional[str] = None
    oov: str = "error"
    oov_replacement: Optional[str] = None

    def __post_init__(self) -> None:
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

    tokenizer: CharTokenizer
    train: np.ndarray  # (N,) token ids of source
    val: Optional[np.ndarray]  # (M,) token ids of val_source, or None
    path: Path  # the cache entry
    from_cache: bool = False
    unknown: Counter = field(default_factory=Counter)  # characters dropped or replaced (oov policy)


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One opened source: what it is, what identifies its content, and its documents as streams of text."""

    label: str
    identity: list[Any]  # what was asked for: names the cache entry
    stamp: list[Any]  # what the content is now (file sizes and mtimes, dataset fingerprint)
    size: int  # bytes, roughly: the progress bar's total
    documents: Callable[[Advance, int], Iterator[Iterable[str | bytes]]]  # (advance, chunk_chars) -> documents


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def open_source(source: str, config: CorpusConfig, split: str, cache_dir: Optional[str] = None) -> Source:
    """Opens a data source by its name (see the module docstring); errors say what was wrong and how to fix it."""
    if source == "tinyshakespeare":
        return _file_source(source, [download_tinyshakespeare(cache_dir)], config)
    if source.startswith("hf:"):
        return _hf_source(source, _load_hub_dataset(source[3:], config.hf_config, split), config, split)
    p = Path(source).expanduser()
    if p.is_dir() and _is_saved_dataset(p):
        return _hf_source(source, _load_saved_dataset(p, split), config, split)
    if p.is_dir():
        files = sorted(f for f in p.rglob(config.glob) if f.is_file())
        if not files:
            raise NanoGPTError(
                f"data directory {source} holds no files matching {config.glob!r}; "
                "put text files there, change --data.glob, or pass one file"
            )
        return _file_source(source, files, config)
    if p.is_file():
        return _file_source(source, [p], config)
    raise NanoGPTError(
        f"data source {source!r} does not exist; pass --data.source tinyshakespeare, a file, a directory or hf:NAME"
    )


def _file_source(label: str, files: list[Path], config: CorpusConfig) -> Source:
    stats = [f.stat() for f in files]
    tabular = any(f.suffix.lower() in TABULAR_SUFFIXES for f in files)

    def documents(advance: Advance, chunk_chars: int = CHUNK_CHARS) -> Iterator[Iterable[str]]:
        for f in files:
            suffix = f.suffix.lower()
            if suffix in (".jsonl", ".json"):
                yield from _json_rows(f, config.text_column, advance)
            elif suffix == ".csv":
                yield from _csv_rows(f, config.text_column, advance)
            elif suffix == ".parquet":
                yield from _parquet_rows(f, config.text_column, advance)
            else:
                yield _text_file(f, advance, chunk_chars)  # one document, read in chunks

    return Source(
        label=label,
        identity=["files", str(Path(label).expanduser().resolve()) if label != "tinyshakespeare" else label,
                  config.glob, config.text_column if tabular else None],
        stamp=[[str(f.resolve()), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)],
        size=sum(s.st_size for s in stats),
        documents=documents,
    )


def _text_file(path: Path, advance: Advance, chunk_bytes: int = CHUNK_CHARS) -> Iterator[str | bytes]:
    """The UTF-8 text of a file in chunks; a character split between two chunks is decoded whole.

    ASCII chunks are handed on as bytes, undecoded (the tokenizer takes them as they are).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a split character held back from the last chunk
            if raw and not pending and raw.isascii():
                offset += len(raw)
                advance(len(raw))
                yield raw
                continue
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise NanoGPTError(
                    f"data file {path} is not UTF-8 text (bad byte at offset {offset - pending + e.start}); "
                    "convert it to UTF-8"
                ) from None
            offset += len(raw)
            advance(len(raw))
            if text:
                yield text
            if not raw:
                return


def _cell(row: Any, column: str, where: str) -> str:
    """The text of one row: column's value; None counts as an empty document."""
    if not isinstance(row, dict):
        raise NanoGPTError(f"{where} is not an object with a {column!r} field; each row must be a JSON object")
    if column not in row:
        raise NanoGPTError(
            f"{where} has no column {column!r} (columns: {', '.join(map(str, row)) or 'none'}); "
            "pass the one that holds the text with --data.text_column NAME"
        )
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NanoGPTError(f"{where}: column {column!r} holds {type(value).__name__}, not text; pick a text column")
    return value


def _json_rows(path: Path, column: str, advance: Advance) -> Iterator[list[str]]:
    """Rows of a JSON-lines file (or of a .json file holding one array of objects, which is read whole)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                rows = json.load(f)
            except ValueError as e:
                raise NanoGPTError(f"{path} is not valid JSON ({e}); fix the file or write it as JSON lines") from None
            advance(path.stat().st_size)
            for i, row in enumerate(rows):
                yield [_cell(row, column, f"{path} item {i}")]
            return
        for lineno, line in enumerate(f, 1):
            advance(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise NanoGPTError(f"{path} line {lineno} is not valid JSON ({e}); one JSON object per line") from None
            yield [_cell(row, column, f"{path} line {lineno}")]


def _missing_column(path: Any, column: str, names: list[str]) -> NanoGPTError:
    return NanoGPTError(
        f"{path} has no column {column!r} (columns: {', '.join(names) or 'none'}); "
        "pass the one that holds the text with --data.text_column NAME"
    )


def _csv_rows(path: Path, column: str, advance: Advance) -> Iterator[list[str]]:
    """Rows of a CSV file with a header line, streamed in blocks by pyarrow (quoted fields may span lines)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(block_size=1 << 24)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    try:
        with open(path, "rb") as f:
            names = pcsv.open_csv(f, read_options=read, parse_options=parse).schema.names
        if column not in names:
            raise _missing_column(path, column, names)
        # the text column is read as strings whatever it looks like; the other columns are never parsed
        convert = pcsv.ConvertOptions(column_types={column: pa.string()}, include_columns=[column])
        with open(path, "rb") as f:
            reader = pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
            done = 0
            for batch in reader:
                for text in batch.column(0).to_pylist():
                    yield [text or ""]
                advance(f.tell() - done)
                done = f.tell()
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise NanoGPTError(
            f"{path} could not be read as CSV with a header line ({_first_line(e)}); fix the file"
        ) from None


def _parquet_rows(path: Path, column: str, advance: Advance) -> Iterator[list[str]]:
    """Rows of a Parquet file, read in record batches of the one text column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise NanoGPTError(f"{path} is not a readable Parquet file ({e}); fix or rewrite it") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise _missing_column(path, column, names)
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise NanoGPTError(f"{path}: column {column!r} holds {kind}, not text; pick a text column")
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        yield from ([text or ""] for text in batch.column(0).to_pylist())
        advance(size * batch.num_rows // rows)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_hub_dataset(name: str, hf_config: Optional[str], split: str) -> Any:
    import datasets

    if not name:
        raise NanoGPTError("--data.source hf: needs a dataset name, e.g. hf:Salesforce/wikitext")
    try:
        return datasets.load_dataset(name, hf_config, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, bad config or split)
        which = f"config {hf_config!r}, split {split!r}" if hf_config else f"split {split!r}"
        raise NanoGPTError(
            f"could not load the Hugging Face dataset {name!r} ({which}): "
            f"{_first_line(e)}; check the name, --data.hf_config and --data.hf_split, and without a network "
            "that the dataset is in the local Hugging Face cache"
        ) from None


def _load_saved_dataset(path: Path, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise NanoGPTError(f"{path} looks like a saved dataset but cannot be loaded ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise NanoGPTError(
                f"saved dataset {path} has no split {split!r} (splits: {', '.join(ds)}); pick one with --data.hf_split"
                " (or --data.hf_val_split for the validation source)"
            )
        ds = ds[split]
    return ds


def _hf_source(label: str, ds: Any, config: CorpusConfig, split: str) -> Source:
    column = config.text_column
    if column not in ds.column_names:
        raise _missing_column(f"dataset {label}", column, list(ds.column_names))
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise NanoGPTError(
            f"dataset {label}: column {column!r} holds {ds.features[column]}, not text; pick a text column"
        )
    try:
        size = int(ds.data.nbytes)
    except Exception:  # only the progress bar's total
        size = 0
    rows = max(1, len(ds))

    def documents(advance: Advance, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
        for batch in ds.select_columns([column]).iter(batch_size=1024):
            texts = batch[column]
            yield from ([text or ""] for text in texts)
            advance(size * len(texts) // rows)

    return Source(
        label=label,
        identity=["dataset", label if label.startswith("hf:") else str(Path(label).expanduser().resolve()),
                  config.hf_config, split, column],
        stamp=[ds._fingerprint, len(ds)],
        size=size,
        documents=documents,
    )


def join_documents(documents: Iterable[Iterable[str | bytes]], separator: str) -> Iterator[str | bytes]:
    """The pieces of the documents with separator between non-empty documents (empty ones are skipped)."""
    first = True
    for doc in documents:
        started = False
        for piece in doc:
            if not piece:
                continue
            if not started:
                if not first and separator:
                    yield separator
                started, first = True, False
            yield piece


def rechunk(pieces: Iterable[str | bytes], chunk_chars: int = CHUNK_CHARS) -> Iterator[str | bytes]:
    """Groups small pieces (rows) into chunks of about chunk_chars, so encoding stays vectorised."""
    buffer: list[str | bytes] = []
    size = 0
    for piece in pieces:
        buffer.append(piece)
        size += len(piece)
        if size >= chunk_chars:
            yield concat(buffer)
            buffer, size = [], 0
    if buffer:
        yield concat(buffer)


def concat(pieces: list[str | bytes]) -> str | bytes:
    """Joins text pieces, str or (ASCII) bytes: bytes when every piece is ASCII, else str."""
    if len(pieces) == 1:
        return pieces[0]
    if any(isinstance(p, bytes) for p in pieces) and all(isinstance(p, bytes) or p.isascii() for p in pieces):
        return b"".join(p if isinstance(p, bytes) else p.encode("ascii") for p in pieces)
    return "".join(p.decode("utf-8") if isinstance(p, bytes) else p for p in pieces)


def read_corpus(source: str, cache_dir: Optional[str] = None, separator: str = "\n\n") -> str:
    """The whole text of a source as one string (small corpora; training streams it instead)."""
    src = open_source(source, CorpusConfig(source=source, separator=separator), "train", cache_dir)
    text = concat([""] + list(join_documents(src.documents(lambda n: None), separator)))
    text = text.decode("ascii") if isinstance(text, bytes) else text
    if not text:
        raise NanoGPTError(f"data source {source} is empty; give it some text to train on")
    return text


# ------------------------------------------------------------------------------------------- vocabulary


def load_vocab(path: str) -> CharTokenizer:
    """The vocabulary stored in a checkpoint, a run dir (its best, else last, checkpoint) or a .json file.

    A .json file holds a tokenizer dict ({"type": "char", "chars": [...]}) or an object with one under
    "tokenizer" (as a corpus cache entry's meta.json does).
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NanoGPTError(f"vocabulary file {path} is not valid JSON ({e})") from None
        if isinstance(d, dict) and "tokenizer" in d:
            d = d["tokenizer"]
        try:
            return CharTokenizer.from_dict(d)
        except NanoGPTError as e:
            raise NanoGPTError(f"vocabulary file {path}: {e}") from None
    if not p.exists():
        raise NanoGPTError(f"--data.vocab {path} does not exist; pass a checkpoint, a run dir or a vocabulary .json")
    import torch

    file = resolve_checkpoint(path)
    try:  # plain data only, and memory-mapped: the weights are never read
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling, zip and I/O errors all mean the same here
        raise NanoGPTError(f"--data.vocab {file} is not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
        raise NanoGPTError(f"--data.vocab {file}: the checkpoint stores no vocabulary; pass one written by train.py")
    return CharTokenizer.from_dict(ckpt["tokenizer"])


# ------------------------------------------------------------------------------------------- encoding


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


def _chunks(source: Source, separator: str, advance: Advance, chunk_chars: int) -> Iterator[str | bytes]:
    return rechunk(join_documents(source.documents(advance, chunk_chars), separator), chunk_chars)


def _encode_to_file(
    source: Source, tokenizer: CharTokenizer, config: CorpusConfig, path: Path, progress: Advance, chunk_chars: int
) -> tuple[int, Counter]:
    """Streams source through the tokenizer into path (raw ids); returns the token count and the unknown chars."""
    dtype = token_dtype(tokenizer.vocab_size)
    replacement = config.oov_replacement if config.oov == "replace" else None
    unknown: Counter = Counter()
    n = 0
    with open(path, "wb") as f:
        for chunk in _chunks(source, config.separator, progress, chunk_chars):
            ids, bad = tokenizer.encode_known(chunk, dtype, replacement)
            unknown.update(bad)
            if config.oov == "error" and unknown:
                continue  # keep reading only to list every unknown character with its count
            f.write(memoryview(np.ascontiguousarray(ids)))
            n += len(ids)
        f.flush()
        os.fsync(f.fileno())  # complete on disk before the entry is renamed into place
        if hasattr(os, "posix_fadvise"):
            # drop the freshly written pages from the page cache: they sit in large folios, and a memory map
            # faults in a whole folio (up to MBs) per touched block, which shows up as RSS while training
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return n, unknown


def _key(*parts: Any) -> str:
    return _sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))


def _open_tokens(path: Path, dtype: str, n: int) -> np.ndarray:
    if path.stat().st_size != n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} has the wrong size")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    mm = getattr(tokens, "_mmap", None)  # the mmap.mmap under np.memmap
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
        tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
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


def _build_entry(
    entry: Path,
    key: str,
    config: CorpusConfig,
    train_src: Source,
    val_src: Optional[Source],
    given: Optional[CharTokenizer],
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
        if tokenizer is None:
            progress = _Progress(total, "vocabulary", progress_min_bytes)
            read = Counter()  # characters read, and whether all were: tells an empty corpus from other errors

            def chunks() -> Iterator[str | bytes]:
                for s in sources:
                    for chunk in _chunks(s, config.separator, progress, chunk_chars):
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
        if config.oov == "replace" and config.oov_replacement not in tokenizer.chars:
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
    train_src = open_source(config.source, config, config.hf_split, cache_dir)
    val_src = open_source(config.val_source, config, config.hf_val_split, cache_dir) if config.val_source else None
    given = load_vocab(config.vocab) if config.vocab else None
    options = [config.separator, config.oov, config.oov_replacement]
    identity = _key(CACHE_FORMAT, train_src.identity, val_src and val_src.identity, config.vocab, options)
    key = _key(identity, train_src.stamp, val_src and val_src.stamp, given and given.chars)
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
