"""Training data: a corpus encoded once into a memory-mapped cache (nanogpt.token_cache), served as blocks.

Training batches are a pure function of (seed, global rank, world size, step): ranks never draw the same
blocks and a resumed run continues the very same sequence. Validation uses a fixed set of blocks.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nanogpt.distributed import BatchPlan, plan_batch
from nanogpt.errors import NanoGPTError
from nanogpt.token_cache import CorpusConfig, prepare_corpus
from nanogpt.tokenizer import Tokenizer


def blocks_at(
    tokens: Union[np.ndarray, torch.Tensor], starts: np.ndarray, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks at the given starts (B,): inputs and next-token targets, each (B, block_size), int64.

    tokens is a numpy array (gathered on the host) or a torch tensor on any device (gathered there, so a
    corpus held on the GPU never crosses the bus); both give the same blocks, on the tokens' device.
    """
    if isinstance(tokens, torch.Tensor):
        # only the B start offsets travel to the device; no host sync (a pageable copy is staged, not awaited)
        starts_t = torch.from_numpy(starts).to(tokens.device, non_blocking=True)
        offsets = torch.arange(block_size + 1, device=tokens.device)
        blocks = tokens[starts_t[:, None] + offsets].long()  # (B, block_size + 1)
    else:
        blocks = tokens[starts[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1)
        blocks = torch.from_numpy(blocks.astype(np.int64))
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def sample_rank_batch(
    tokens: Union[np.ndarray, torch.Tensor],
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
    """Text for GPT training, as characters or subword tokens (see CorpusConfig.tokenizer).

    Args:
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
        tokens_on_device: keep the training split on the training device and gather batches there; None (auto):
            on a GPU when it takes at most a tenth of the free memory, else gather on the host and copy pinned.
        **corpus: what to read and how to encode it: the fields of nanogpt.token_cache.CorpusConfig (source, glob,
            text_column, hf_config, hf_split, separator, val_source, hf_val_split, tokenizer, bpe_vocab_size, vocab,
            oov, oov_replacement),
            each a --data.NAME flag documented there.
    """

    def __init__(
        self,
        batch_size: int = 64,
        block_size: int = 256,
        val_fraction: float = 0.1,
        val_blocks: int = 256,
        seed: int = 1337,
        cache_dir: Optional[str] = None,
        micro_batch_size: Optional[int] = None,
        tokens_on_device: Optional[bool] = None,
        **corpus: Any,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.val_blocks = val_blocks
        self.seed = seed
        self.cache_dir = cache_dir
        # the options are checked here (CorpusConfig's own checks); the data is read in prepare_data/setup
        self.corpus = CorpusConfig(**corpus)
        self.micro_batch_size = micro_batch_size
        self.batch_plan: Optional[BatchPlan] = None  # set by apply_batch_plan once a Trainer gives the world size
        self.tokens_on_device = tokens_on_device
        self._device_tokens: Optional[torch.Tensor] = None  # the training split on the training device
        self._tokens: Optional[np.ndarray] = None
        self._val: Optional[np.ndarray] = None  # the val_source tokens, when there is one
        self._prepared = None
        self._tokenizer: Optional[Tokenizer] = None

    def prepare_data(self) -> None:
        """Downloads and encodes the corpus into the cache (Lightning calls this on one process per node)."""
        if self._prepared is None:
            self._prepared = prepare_corpus(self.corpus, self.cache_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        """Reads and encodes the corpus (from the cache when it was seen before) and checks the splits.

        Under a Trainer, also splits the global batch over its world size (apply_batch_plan).
        """
        if self.trainer is not None:
            self.apply_batch_plan(self.trainer)
        if self._tokens is not None:
            return
        for name in ("batch_size", "block_size", "val_blocks"):
            if getattr(self, name) < 1:
                raise NanoGPTError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise NanoGPTError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        # memory-mapped from the cache (built there by prepare_data, or here on the other nodes' ranks)
        corpus = self._prepared or prepare_corpus(self.corpus, self.cache_dir)
        tokens, tokenizer = corpus.train, corpus.tokenizer
        n_val = 0 if corpus.val is not None else int(len(tokens) * self.val_fraction)
        n_train = len(tokens) - n_val
        need = self.block_size + 1
        if len(tokens) < need:
            raise NanoGPTError(
                f"data source {self.corpus.source} has {len(tokens)} characters, fewer than block_size+1 = {need}; "
                "use more text or a smaller --model.block_size"
            )
        if n_train < need:
            raise NanoGPTError(
                f"the training split has {n_train} characters, fewer than block_size+1 = {need}; "
                "lower --data.val_fraction or --model.block_size, or use more text"
            )
        if corpus.val is not None and len(corpus.val) < need:
            raise NanoGPTError(
                f"the validation source {self.corpus.val_source} has {len(corpus.val)} characters, "
                f"fewer than block_size+1 = {need}; use more validation text or a smaller --model.block_size"
            )
        if corpus.val is None and n_val < need:
            raise NanoGPTError(
                f"the validation split has {n_val} characters (val_fraction={self.val_fraction}), fewer than "
                f"block_size+1 = {need}; raise --data.val_fraction or lower --model.block_size, or use more text"
            )
        self._tokens, self._tokenizer, self._val = tokens, tokenizer, corpus.val
        self._n_train = n_train

    def apply_batch_plan(self, trainer: L.Trainer) -> BatchPlan:
        """Splits the global batch over trainer's world size and sets the trainer's gradient accumulation to match.

        The CLI calls this as soon as its Trainer exists (a batch that does not divide is refused before any
        process is launched); setup calls it again on every rank, which changes nothing once the plan is applied.
        """
        plan = self.batch_plan
        if plan is None or (plan.world_size, plan.accumulation) != (trainer.world_size, trainer.accumulate_grad_batches):
            plan = plan_batch(self.batch_size, trainer.world_size, self.micro_batch_size, trainer.accumulate_grad_batches)
            trainer.accumulate_grad_batches = plan.accumulation
            self.batch_plan = plan
        return plan

    @property
    def source(self) -> str:
        """The training source (--data.source), as the run's hyperparameters name it."""
        return self.corpus.source

    @property
    def tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer (characters or subwords); reads the data on first use (the CLI needs it to size the model)."""
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
        return self._tokens[self._n_train :] if self._val is None else self._val

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def micro_batch(self) -> int:
        """Sequences per device per micro-step (the whole batch when no Trainer has planned a split)."""
        return self.batch_plan.micro_batch if self.batch_plan is not None else self.batch_size

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # every batch is an (x, y) pair of tensors: one direct copy each instead of Lightning's walk over any
        # collection (a few dozen microseconds a step, which a small model on a CPU notices)
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        accumulation = self.batch_plan.accumulation if self.batch_plan is not None else 1
        # continue the batch sequence where a resumed run left off (loops are restored before this is called)
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        tokens = self._train_tokens_for(device)
        ds = RandomBlocks(tokens, self.block_size, self.micro_batch, self.seed, rank, start, world, accumulation)
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
        ds = FixedBlocks(self.val_tokens, starts[rank::world], self.block_size, self.micro_batch)
        # its own generator: each validation's iterator draws a base seed from it, not from the global RNG that
        # dropout uses, so validating never shifts the training's random stream
        return DataLoader(ds, batch_size=None, generator=torch.Generator())
