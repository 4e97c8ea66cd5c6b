"""Character data: read a corpus, encode it once (cached on disk), and serve blocks for training.

Training batches are a pure function of (seed, global rank, step): ranks never draw the same
blocks and a resumed run continues the very same sequence. Validation uses a fixed set of blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nanogpt.errors import NanoGPTError
from nanogpt.tokenizer import CharTokenizer

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where downloads and encoded corpora live: cache_dir, else $NANOGPT_CACHE, else ~/.cache/nanogpt."""
    return Path(cache_dir or os.environ.get("NANOGPT_CACHE") or Path.home() / ".cache" / "nanogpt").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes data to path through a temporary file in the same directory, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _atomic_write(path, data)
    return path


def read_corpus(source: str, cache_dir: Optional[str] = None, separator: str = "\n\n") -> str:
    """The text of a source: "tinyshakespeare", a text file, or a directory of .txt files (recursive, sorted)."""
    if source == "tinyshakespeare":
        files = [download_tinyshakespeare(cache_dir)]
    else:
        p = Path(source).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not files:
                raise NanoGPTError(f"data directory {source} holds no .txt files; put text files there or pass one file")
        elif p.is_file():
            files = [p]
        else:
            raise NanoGPTError(
                f"data source {source!r} does not exist; pass --data.source tinyshakespeare, a text file or a directory"
            )
    texts = []
    for f in files:
        raw = f.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise NanoGPTError(f"data file {f} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8")
    text = separator.join(t for t in texts if t)
    if not text:
        raise NanoGPTError(f"data source {source} is empty; give it some text to train on")
    return text


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned dtype that holds every token id."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def encode_cached(text: str, cache_dir: Optional[str] = None) -> tuple[np.ndarray, CharTokenizer]:
    """Encodes text with its own character vocabulary; the result is cached on disk by content hash."""
    key = _sha256(text.encode("utf-8"))
    base = cache_root(cache_dir) / "encoded"
    tokens_path, vocab_path = base / f"{key}.npy", base / f"{key}.json"
    if tokens_path.is_file() and vocab_path.is_file():
        try:
            tokenizer = CharTokenizer.from_dict(json.loads(vocab_path.read_text(encoding="utf-8")))
            tokens = np.load(tokens_path, mmap_mode="r")
            if len(tokens) == len(text):
                return tokens, tokenizer
        except (ValueError, OSError, NanoGPTError):
            pass  # a damaged cache entry is rebuilt below
    tokenizer = CharTokenizer.from_text(text)
    tokens = tokenizer.encode(text, dtype=token_dtype(tokenizer.vocab_size))
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=base) as f:  # np.save to memory, then one atomic write
        np.save(f, tokens)
        f.seek(0)
        _atomic_write(tokens_path, f.read())
    _atomic_write(vocab_path, json.dumps(tokenizer.to_dict()).encode("utf-8"))
    return tokens, tokenizer


def sample_batch(
    tokens: Union[np.ndarray, torch.Tensor], block_size: int, batch_size: int, seed: int, rank: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch for (seed, rank, step): batch_size random blocks, inputs and next-token targets.

    tokens is a numpy array (gathered on the host) or a torch tensor on any device (gathered there, so a
    corpus held on the GPU never crosses the bus); both give the same batch.
    Returns x, y of shape (batch_size, block_size), int64, on the tokens' device; y is x shifted left by one.
    """
    rng = np.random.default_rng([seed, rank, step])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)  # (B,), block+1 tokens fit after each
    if isinstance(tokens, torch.Tensor):
        # only the B start offsets travel to the device; no host sync (a pageable copy is staged, not awaited)
        starts_t = torch.from_numpy(starts).to(tokens.device, non_blocking=True)
        offsets = torch.arange(block_size + 1, device=tokens.device)
        blocks = tokens[starts_t[:, None] + offsets].long()  # (B, block_size + 1)
    else:
        blocks = tokens[starts[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1)
        blocks = torch.from_numpy(blocks.astype(np.int64))
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def tokens_to_device(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of tokens on device, in the narrowest dtype every backend indexes (uint8, else int32)."""
    host = np.array(tokens, dtype=np.uint8 if tokens.dtype == np.uint8 else np.int32)  # a copy: memmaps are read-only
    return torch.from_numpy(host).to(device)


def tokens_fit_on_device(n_bytes: int, device: torch.device, max_share: float = 0.1) -> bool:
    """Whether a corpus of n_bytes may live on device: a CUDA device with n_bytes within max_share of its free memory.

    The CPU never needs a copy (its batches are gathered straight from the array); a corpus too large for the
    GPU is gathered on the host and sent over in pinned, non-blocking copies instead.
    """
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes <= max_share * free


class RandomBlocks(IterableDataset):
    """An endless stream of training batches for one rank, starting at a given step."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int, start_step: int = 0
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start_step
        while True:
            yield sample_batch(self.tokens, self.block_size, self.batch_size, self.seed, self.rank, step)
            step += 1


def val_block_starts(n_tokens: int, block_size: int, n_blocks: int) -> np.ndarray:
    """Start positions of the fixed validation blocks: n_blocks evenly spaced over the split."""
    last = n_tokens - block_size - 1
    return np.unique(np.linspace(0, last, num=n_blocks).round().astype(np.int64))


class FixedBlocks(IterableDataset):
    """The validation blocks at the given starts, in order, as batches (the same at every evaluation)."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, block_size: int, batch_size: int) -> None:
        self.tokens, self.starts, self.block_size, self.batch_size = tokens, starts, block_size, batch_size

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.starts), self.batch_size):
            starts = self.starts[i : i + self.batch_size]
            blocks = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
            yield blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


class CharDataModule(L.LightningDataModule):
    """Character-level text for GPT training.

    Args:
        source: "tinyshakespeare" (downloaded once into the cache), a text file, or a directory of .txt files.
        batch_size: sequences per training step on each device.
        block_size: context length; linked from model.block_size by the CLI.
        val_fraction: share of the corpus, taken from its end, held out for validation.
        val_blocks: number of fixed validation blocks, spread evenly over the validation split.
        seed: seed of the training batch sequence (batches are a function of seed, rank and step).
        cache_dir: where downloads and encoded corpora are cached (default $NANOGPT_CACHE or ~/.cache/nanogpt).
        tokens_on_device: keep the training split on the training device and gather batches there; None (auto):
            on a GPU when it takes at most a tenth of the free memory, else gather on the host and copy pinned.
    """

    def __init__(
        self,
        source: str = "tinyshakespeare",
        batch_size: int = 64,
        block_size: int = 256,
        val_fraction: float = 0.1,
        val_blocks: int = 256,
        seed: int = 1337,
        cache_dir: Optional[str] = None,
        tokens_on_device: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.val_blocks = val_blocks
        self.seed = seed
        self.cache_dir = cache_dir
        self.tokens_on_device = tokens_on_device
        self._device_tokens: Optional[torch.Tensor] = None  # the training split on the training device
        self._tokens: Optional[np.ndarray] = None
        self._tokenizer: Optional[CharTokenizer] = None

    def prepare_data(self) -> None:
        """Downloads the default corpus once (Lightning calls this on one process per node)."""
        if self.source == "tinyshakespeare":
            download_tinyshakespeare(self.cache_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        """Reads and encodes the corpus (from the cache when it was seen before) and checks the splits."""
        if self._tokens is not None:
            return
        for name in ("batch_size", "block_size", "val_blocks"):
            if getattr(self, name) < 1:
                raise NanoGPTError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise NanoGPTError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        tokens, tokenizer = encode_cached(read_corpus(self.source, self.cache_dir), self.cache_dir)
        n_val = int(len(tokens) * self.val_fraction)
        n_train = len(tokens) - n_val
        need = self.block_size + 1
        if len(tokens) < need:
            raise NanoGPTError(
                f"data source {self.source} has {len(tokens)} characters, fewer than block_size+1 = {need}; "
                "use more text or a smaller --model.block_size"
            )
        if n_train < need:
            raise NanoGPTError(
                f"the training split has {n_train} characters, fewer than block_size+1 = {need}; "
                "lower --data.val_fraction or --model.block_size, or use more text"
            )
        if n_val < need:
            raise NanoGPTError(
                f"the validation split has {n_val} characters (val_fraction={self.val_fraction}), fewer than "
                f"block_size+1 = {need}; raise --data.val_fraction or lower --model.block_size, or use more text"
            )
        self._tokens, self._tokenizer = tokens, tokenizer
        self._n_train = n_train

    @property
    def tokenizer(self) -> CharTokenizer:
        """The corpus's vocabulary; reads the data on first use (the CLI needs it to size the model)."""
        if self._tokenizer is None:
            self.prepare_data()
            self.setup()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def train_tokens(self) -> np.ndarray:
        self.setup()
        return self._tokens[: self._n_train]

    @property
    def val_tokens(self) -> np.ndarray:
        self.setup()
        return self._tokens[self._n_train :]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank_and_world()
        # continue the batch sequence where a resumed run left off (loops are restored before this is called)
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        tokens = self._train_tokens_for(device)
        ds = RandomBlocks(tokens, self.block_size, self.batch_size, self.seed, rank, start)
        # host-gathered batches reach a GPU from pinned memory; Lightning copies them with non_blocking=True
        pin = device.type == "cuda" and not isinstance(tokens, torch.Tensor)
        return DataLoader(ds, batch_size=None, pin_memory=pin)

    def _train_tokens_for(self, device: torch.device) -> Union[np.ndarray, torch.Tensor]:
        """The training split where batches are gathered: a tensor on device, or the host array."""
        host = self.train_tokens
        on_device = self.tokens_on_device
        if on_device is None:
            on_device = tokens_fit_on_device(host.nbytes, device)
        if not on_device:
            return host
        if self._device_tokens is None or self._device_tokens.device != device:
            self._device_tokens = tokens_to_device(host, device)  # once per fit, not per batch
        return self._device_tokens

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        starts = val_block_starts(len(self.val_tokens), self.block_size, self.val_blocks)
        # each rank takes every world-th block: no overlap, no padding, so reduced metrics match one process
        ds = FixedBlocks(self.val_tokens, starts[rank::world], self.block_size, self.batch_size)
        return DataLoader(ds, batch_size=None)
