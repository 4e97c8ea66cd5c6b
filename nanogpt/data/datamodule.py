"""Training data: a corpus encoded once into a memory-mapped cache (nanogpt.data.token_cache), served as blocks.

Training batches are a pure function of (seed, global rank, world size, step): ranks never draw the same
blocks and a resumed run continues the very same sequence. Validation uses a fixed set of blocks.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from nanogpt.data.batch_plan import BatchPlan, plan_batch
from nanogpt.data.blocks import DataSkips, FixedBlocks, RandomBlocks, tokens_fit_on_device, tokens_to_device, val_block_starts
from nanogpt.errors import NanoGPTError
from nanogpt.data.splits import DEFAULT_VAL_BLOCKS, DEFAULT_VAL_FRACTION, split_tokens
from nanogpt.data.token_cache import CorpusConfig, EncodedCorpus, prepare_corpus
from nanogpt.tokenizers.char import Tokenizer


class TextDataModule(L.LightningDataModule):
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
        **corpus: what to read and how to encode it: the fields of nanogpt.data.token_cache.CorpusConfig (source, glob,
            text_column, hf_config, hf_split, separator, val_source, hf_val_split, tokenizer, bpe_vocab_size, vocab,
            oov, oov_replacement),
            each a --data.NAME flag documented there.
    """

    def __init__(
        self,
        batch_size: int = 64,
        block_size: int = 256,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        val_blocks: int = DEFAULT_VAL_BLOCKS,
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
        self._planned_for: Optional[L.Trainer] = None  # the Trainer batch_plan was applied to
        self.tokens_on_device = tokens_on_device
        self._device_tokens: Optional[torch.Tensor] = None  # the training split on the training device
        self._tokens: Optional[np.ndarray] = None
        self._val: Optional[np.ndarray] = None  # the val_source tokens, when there is one
        self._prepared: Optional[EncodedCorpus] = None  # the encoded corpus, checked (prepare_data)
        self._n_train = 0
        self._tokenizer: Optional[Tokenizer] = None
        # training data passed over after rollbacks: set by nanogpt.training.rollback from the run's checkpoint
        self.skips = DataSkips()

    def prepare_data(self) -> None:
        """Downloads and encodes the corpus into the cache and checks its splits (Lightning calls this on one process
        per node, the CLI once more through vocab_size; the corpus is prepared once per process either way)."""
        if self._prepared is None:
            corpus = prepare_corpus(self.corpus, self.cache_dir)
            self._n_train = self._checked_split(corpus)
            self._prepared = corpus

    def setup(self, stage: Optional[str] = None) -> None:
        """Memory-maps the encoded corpus (prepared here on the ranks that did not prepare it).

        Under a Trainer, also splits the global batch over its world size (apply_batch_plan; the CLI has done that
        already, a Trainer built by hand has not).
        """
        if self.trainer is not None:
            self.apply_batch_plan(self.trainer)
        if self._tokens is not None:
            return
        self.prepare_data()  # memory-mapped from the cache: built there by prepare_data, or now on other nodes' ranks
        corpus = self._prepared
        self._tokens, self._tokenizer, self._val = corpus.train, corpus.tokenizer, corpus.val

    def _checked_split(self, corpus: EncodedCorpus) -> int:
        """The number of training tokens in corpus, after checking the options and that both splits hold a block."""
        for name in ("batch_size", "block_size", "val_blocks"):
            if getattr(self, name) < 1:
                raise NanoGPTError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise NanoGPTError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        train, _ = split_tokens(corpus, self.corpus, self.val_fraction, self.block_size)
        return len(train)

    def apply_batch_plan(self, trainer: L.Trainer) -> BatchPlan:
        """The one place the global batch is split: plans it for trainer's world size and applies the plan to trainer.

        Sets the trainer's gradient accumulation, and counts an integer val_check_interval in optimizer steps
        (Lightning counts it in micro-batches). Once per Trainer: the CLI calls this as soon as its Trainer exists
        (a batch that does not divide is refused before any process is launched), and setup for a Trainer built by
        hand; a second call for the same Trainer changes nothing. Readers take the plan from batch_plan_of(trainer).
        """
        if self.batch_plan is not None and self._planned_for is trainer:
            return self.batch_plan
        plan = plan_batch(self.batch_size, trainer.world_size, self.micro_batch_size, trainer.accumulate_grad_batches)
        trainer.accumulate_grad_batches = plan.accumulation
        if isinstance(trainer.val_check_interval, int):
            trainer.val_check_interval *= plan.accumulation
        self.batch_plan, self._planned_for = plan, trainer
        return plan

    @property
    def source(self) -> str:
        """The training source (--data.source), as the run's hyperparameters name it."""
        return self.corpus.source

    @property
    def tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer (characters or subwords).

        The CLI reads it (vocab_size) to size the model before training starts: that prepares the corpus (the one
        encoding into the cache, or a cache hit) and nothing more; setup is left to the Trainer.
        """
        if self._tokenizer is None:
            self.prepare_data()
            self._tokenizer = self._prepared.tokenizer
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
        ds = RandomBlocks(
            tokens, self.block_size, self.micro_batch, self.seed, rank, start, world, accumulation, self.skips
        )
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


# the name before subword tokens came: config.yaml files and scripts that name it keep working
CharDataModule = TextDataModule


def batch_plan_of(trainer: L.Trainer) -> Optional[BatchPlan]:
    """The split of the global batch that trainer trains with: its TextDataModule's (None for other data)."""
    datamodule = trainer.datamodule
    return datamodule.batch_plan if isinstance(datamodule, TextDataModule) else None
