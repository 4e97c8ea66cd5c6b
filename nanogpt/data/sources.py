"""Data sources: read text from any source as a stream of documents, without loading it whole.

Sources (``--data.source`` / ``--data.val_source``):
  * ``tinyshakespeare``: downloaded once into the package cache and checked against its sha256;
  * a text file (UTF-8, read in chunks: a file may be larger than memory);
  * a directory: every file matching ``glob`` below it, recursively, in sorted order, each read by its suffix;
  * ``.jsonl``, ``.json``, ``.csv`` and ``.parquet`` files: one document per row, from column ``text_column``;
  * a folder written by ``datasets``' ``save_to_disk`` (detected), or ``hf:NAME``, loaded with
    ``datasets.load_dataset(NAME, hf_config, split=split)``.
Text is kept exactly as it is: CRLF stays CRLF, combining characters stay separate code points (no Unicode
normalisation). Encoding the text into tokens, and caching them, is nanogpt.data.token_cache's job.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from nanogpt.io import atomic_write
from nanogpt.errors import NanoGPTError, first_line
from nanogpt.private import dataset_fingerprint

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

CHUNK_CHARS = 1 << 22  # text is read and encoded in pieces of about 4M characters: memory stays bounded
TABULAR_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Advance = Callable[[int], None]  # told how many source bytes were consumed, for the progress bar


@dataclass(frozen=True)
class SourceFlags:
    """The command-line flags a source's settings came from: its errors name the flags of the command that
    called (train.py's --data.source, nanogpt-eval's --source)."""

    source: str = "--data.source"
    split: str = "--data.hf_split"
    glob: str = "--data.glob"
    text_column: str = "--data.text_column"
    hf_config: str = "--data.hf_config"


TRAIN_FLAGS = SourceFlags()
VAL_FLAGS = SourceFlags(source="--data.val_source", split="--data.hf_val_split")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where downloads and encoded corpora live: cache_dir, else $NANOGPT_CACHE, else ~/.cache/nanogpt."""
    return Path(cache_dir or os.environ.get("NANOGPT_CACHE") or Path.home() / ".cache" / "nanogpt").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tinyshakespeare_path(cache_dir: Optional[str] = None) -> Path:
    """Where the verified tiny-shakespeare download lives in the cache (put there by the first run that reads it)."""
    return cache_root(cache_dir) / "tinyshakespeare" / "input.txt"


def download_tinyshakespeare(cache_dir: Optional[str] = None, flag: str = TRAIN_FLAGS.source) -> Path:
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
            f"copy the file to {path} or train on a local file with {flag} PATH"
        ) from None
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        raise NanoGPTError(
            f"the tiny-shakespeare download from {url} failed its sha256 check ({_sha256(data)[:12]}… "
            f"instead of {TINYSHAKESPEARE_SHA256[:12]}…); try again, or pass a local file with {flag} PATH"
        )
    atomic_write(path, lambda f: f.write(data))
    return path


@dataclass
class Source:
    """One opened source: what it is, what identifies its content, and its documents as streams of text."""

    label: str
    identity: list[Any]  # what was asked for: names the cache entry
    stamp: list[Any]  # what the content is now (file sizes and mtimes, dataset fingerprint)
    size: int  # bytes, roughly: the progress bar's total
    documents: Callable[[Advance, int], Iterator[Iterable[str | bytes]]]  # (advance, chunk_chars) -> documents

    def text(self, separator: str, advance: Advance = lambda n: None,
             chunk_chars: int = CHUNK_CHARS) -> Iterator[str | bytes]:
        """The whole text, documents joined by separator, in chunks of about chunk_chars (what tokenizers encode)."""
        return rechunk(join_documents(self.documents(advance, chunk_chars), separator), chunk_chars)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def open_source(
    source: str,
    split: str = "train",
    glob: str = "*.txt",
    text_column: str = "text",
    hf_config: Optional[str] = None,
    cache_dir: Optional[str] = None,
    flags: SourceFlags = TRAIN_FLAGS,
) -> Source:
    """Opens a data source by its name (see the module docstring); errors say what was wrong and how to fix it.

    split is read from hf: sources and saved dataset dicts; glob picks a directory's files; text_column is the
    column of tabular files and datasets that holds the text; hf_config is load_dataset's configuration; flags
    are the caller's names of these settings, for its errors.
    """
    if source == "tinyshakespeare":
        return _file_source(source, [download_tinyshakespeare(cache_dir, flags.source)], glob, text_column, flags)
    if source.startswith("hf:"):
        dataset = _load_hub_dataset(source[3:], hf_config, split, flags)
        return _hf_source(source, dataset, text_column, hf_config, split, flags)
    p = Path(source).expanduser()
    if p.is_dir() and _is_saved_dataset(p):
        return _hf_source(source, _load_saved_dataset(p, split, flags), text_column, hf_config, split, flags)
    if p.is_dir():
        files = sorted(f for f in p.rglob(glob) if f.is_file())
        if not files:
            raise NanoGPTError(
                f"data directory {source} holds no files matching {glob!r}; "
                f"put text files there, change {flags.glob}, or pass one file"
            )
        return _file_source(source, files, glob, text_column, flags)
    if p.is_file():
        return _file_source(source, [p], glob, text_column, flags)
    raise NanoGPTError(
        f"data source {source!r} does not exist; pass {flags.source} tinyshakespeare, a file, a directory or hf:NAME"
    )


def _file_source(label: str, files: list[Path], glob: str, text_column: str, flags: SourceFlags) -> Source:
    stats = [f.stat() for f in files]
    tabular = any(f.suffix.lower() in TABULAR_SUFFIXES for f in files)

    def documents(advance: Advance, chunk_chars: int = CHUNK_CHARS) -> Iterator[Iterable[str]]:
        for f in files:
            suffix = f.suffix.lower()
            if suffix in (".jsonl", ".json"):
                yield from _json_rows(f, text_column, advance, flags)
            elif suffix == ".csv":
                yield from _csv_rows(f, text_column, advance, flags)
            elif suffix == ".parquet":
                yield from _parquet_rows(f, text_column, advance, flags)
            else:
                yield _text_file(f, advance, chunk_chars)  # one document, read in chunks

    return Source(
        label=label,
        identity=["files", str(Path(label).expanduser().resolve()) if label != "tinyshakespeare" else label,
                  glob, text_column if tabular else None],
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


def _cell(row: Any, column: str, where: str, flags: SourceFlags) -> str:
    """The text of one row: column's value; None counts as an empty document."""
    if not isinstance(row, dict):
        raise NanoGPTError(f"{where} is not an object with a {column!r} field; each row must be a JSON object")
    if column not in row:
        raise NanoGPTError(
            f"{where} has no column {column!r} (columns: {', '.join(map(str, row)) or 'none'}); "
            f"pass the one that holds the text with {flags.text_column} NAME"
        )
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NanoGPTError(f"{where}: column {column!r} holds {type(value).__name__}, not text; pick a text column")
    return value


def _json_rows(path: Path, column: str, advance: Advance, flags: SourceFlags) -> Iterator[list[str]]:
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
                yield [_cell(row, column, f"{path} item {i}", flags)]
            return
        for lineno, line in enumerate(f, 1):
            advance(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise NanoGPTError(f"{path} line {lineno} is not valid JSON ({e}); one JSON object per line") from None
            yield [_cell(row, column, f"{path} line {lineno}", flags)]


def _missing_column(path: Any, column: str, names: list[str], flags: SourceFlags) -> NanoGPTError:
    return NanoGPTError(
        f"{path} has no column {column!r} (columns: {', '.join(names) or 'none'}); "
        f"pass the one that holds the text with {flags.text_column} NAME"
    )


def _csv_rows(path: Path, column: str, advance: Advance, flags: SourceFlags) -> Iterator[list[str]]:
    """Rows of a CSV file with a header line, streamed in blocks by pyarrow (quoted fields may span lines)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(block_size=1 << 24)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    try:
        with open(path, "rb") as f:
            names = pcsv.open_csv(f, read_options=read, parse_options=parse).schema.names
        if column not in names:
            raise _missing_column(path, column, names, flags)
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
            f"{path} could not be read as CSV with a header line ({first_line(e)}); fix the file"
        ) from None


def _parquet_rows(path: Path, column: str, advance: Advance, flags: SourceFlags) -> Iterator[list[str]]:
    """Rows of a Parquet file, read in record batches of the one text column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise NanoGPTError(f"{path} is not a readable Parquet file ({e}); fix or rewrite it") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise _missing_column(path, column, names, flags)
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise NanoGPTError(f"{path}: column {column!r} holds {kind}, not text; pick a text column")
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        yield from ([text or ""] for text in batch.column(0).to_pylist())
        advance(size * batch.num_rows // rows)


def _load_hub_dataset(name: str, hf_config: Optional[str], split: str, flags: SourceFlags) -> Any:
    import datasets

    if not name:
        raise NanoGPTError(f"{flags.source} hf: needs a dataset name, e.g. hf:Salesforce/wikitext")
    try:
        return datasets.load_dataset(name, hf_config, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, bad config or split)
        which = f"config {hf_config!r}, split {split!r}" if hf_config else f"split {split!r}"
        raise NanoGPTError(
            f"could not load the Hugging Face dataset {name!r} ({which}): "
            f"{first_line(e)}; check the name, {flags.hf_config} and {flags.split}, and without a network "
            "that the dataset is in the local Hugging Face cache"
        ) from None


def _load_saved_dataset(path: Path, split: str, flags: SourceFlags) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise NanoGPTError(f"{path} looks like a saved dataset but cannot be loaded ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise NanoGPTError(
                f"saved dataset {path} has no split {split!r} (splits: {', '.join(ds)}); pick one with {flags.split}"
            )
        ds = ds[split]
    return ds


def _hf_source(label: str, ds: Any, column: str, hf_config: Optional[str], split: str, flags: SourceFlags) -> Source:
    if column not in ds.column_names:
        raise _missing_column(f"dataset {label}", column, list(ds.column_names), flags)
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
                  hf_config, split, column],
        stamp=[dataset_fingerprint(ds), len(ds)],
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
