"""Character data: read a corpus, encode it once (cached on disk), and serve blocks for training.

Training batches are a pure function of (seed, global rank, world size, step): ranks never draw the same
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
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nanogpt.distributed import BatchPlan, plan_batch
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
    tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch for (seed, rank, step): batch_size random blocks, inputs and next-token targets.

    Returns x, y of shape (batch_size, block_size), int64; y is x shifted left by one.
    """
    rng = np.random.default_rng([seed, rank, step])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)  # (B,), block+1 tokens fit after each
    return blocks_at(tokens, starts, block_size)


def blocks_at(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks at the given starts (B,): inputs and next-token targets, each (B, block_size), int64."""
    blocks = tokens[starts[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1)
    blocks = torch.from_numpy(blocks.astype(np.int64))
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def sample_rank_batch(
    tokens: np.ndarray,
    block_size: int,
    micro_batch: int,
    seed: int,
    rank: int,
    micro_step: int,
    world_size: int = 1,
    accumulation: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's micro-batch: its share of the global batch of optimizer step micro_step // accumulation.

    The global batch of a step is a pure function of (seed, step) with micro_batch * world_size * accumulation
    blocks, laid out as (accumulation, world_size, micro_batch); each rank takes its own rows, so ranks never
    share blocks and 1, 2 or 8 devices with the same global batch train on the very same sequences.
    Returns x, y of shape (micro_batch, block_size), int64.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    step, i = divmod(micro_step, accumulation)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size, size=micro_batch * world_size * accumulation)  # (global,)
    first = (i * world_size + rank) * micro_batch
    return blocks_at(tokens, starts[first : first + micro_batch], block_size)


class RandomBlocks(IterableDataset):
    """An endless stream of one rank's training micro-batches (of batch_size each), starting at a micro-step."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        start_step: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.world_size, self.accumulation = world_size, accumulation

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start_step
        while True:
            yield sample_rank_batch(
                self.tokens, self.block_size, self.batch_size, self.seed, self.rank, step,
                self.world_size, self.accumulation,
            )
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
            yield blocks_at(self.tokens, self.starts[i : i + self.batch_size], self.block_size)


class CharDataModule(L.LightningDataModule):
    """Character-level text for GPT training.

    Args:
        source: "tinyshakespeare" (downloaded once into the cache), a text file, or a directory of .txt files.
        batch_size: the global batch: sequences per optimizer step, summed over all devices and accumulation
            micro-steps. The same value trains the same way on any number of devices.
        block_size: context length; linked from model.block_size by the CLI.
        val_fraction: share of the corpus, taken from its end, held out for validation.
        val_blocks: number of fixed validation blocks, spread evenly over the validation split.
        seed: seed of the training batch sequence (batches are a function of seed, rank and step).
        cache_dir: where downloads and encoded corpora are cached (default $NANOGPT_CACHE or ~/.cache/nanogpt).
        micro_batch_size: sequences per forward/backward on one device (also the validation batch); the
            gradient accumulation is batch_size / (micro_batch_size x devices). Default: batch_size / devices,
            no accumulation. Lower it when a device runs out of memory; the training stays the same.
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
        micro_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.val_blocks = val_blocks
        self.seed = seed
        self.cache_dir = cache_dir
        self.micro_batch_size = micro_batch_size
        self.batch_plan: Optional[BatchPlan] = None  # set by setup() once a Trainer gives the world size
        self._tokens: Optional[np.ndarray] = None
        self._tokenizer: Optional[CharTokenizer] = None

    def prepare_data(self) -> None:
        """Downloads the default corpus once (Lightning calls this on one process per node)."""
        if self.source == "tinyshakespeare":
            download_tinyshakespeare(self.cache_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        """Reads and encodes the corpus (from the cache when it was seen before) and checks the splits.

        Under a Trainer, also splits the global batch over its world size and sets its gradient accumulation.
        """
        if self.trainer is not None:
            trainer = self.trainer
            self.batch_plan = plan_batch(
                self.batch_size, trainer.world_size, self.micro_batch_size, trainer.accumulate_grad_batches
            )
            trainer.accumulate_grad_batches = self.batch_plan.accumulation
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

    @property
    def micro_batch(self) -> int:
        """Sequences per device per micro-step (the whole batch when no Trainer has planned a split)."""
        return self.batch_plan.micro_batch if self.batch_plan is not None else self.batch_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        accumulation = self.batch_plan.accumulation if self.batch_plan is not None else 1
        # continue the batch sequence where a resumed run left off (loops are restored before this is called)
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        ds = RandomBlocks(
            self.train_tokens, self.block_size, self.micro_batch, self.seed, rank, start, world, accumulation
        )
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        starts = val_block_starts(len(self.val_tokens), self.block_size, self.val_blocks)
        # each rank takes every world-th block: no overlap, no padding, so reduced metrics match one process
        ds = FixedBlocks(self.val_tokens, starts[rank::world], self.block_size, self.micro_batch)
        return DataLoader(ds, batch_size=None)
