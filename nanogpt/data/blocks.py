"""Training and validation blocks from a token array: pure functions of (seed, global rank, world size, step).

Ranks never draw the same blocks, a resumed run continues the very same sequence, and validation uses a fixed set
of evenly spaced blocks. torch and numpy only: `nanogpt-eval` reads the same validation blocks without Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset


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


@dataclass(frozen=True)
class DataSkips:
    """Stretches of training data a run skips (after a rollback): from training step `start` on, every step reads the
    data of `steps` steps further on. The data of a step is then a pure function of (seed, rank, step, skips).

    windows: (start, steps) pairs; their offsets add up for every step at or after their start.
    """

    windows: tuple[tuple[int, int], ...] = ()

    def data_step(self, step: int) -> int:
        """The step whose batch training step `step` reads."""
        return step + sum(n for start, n in self.windows if start <= step)


class RandomBlocks(IterableDataset):
    """An endless stream of one rank's training micro-batches (of batch_size each), starting at a micro-step.

    skips: stretches of data to pass over (DataSkips); micro-steps are training steps', mapped to data steps here.
    """

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
        skips: DataSkips = DataSkips(),
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.world_size, self.accumulation, self.skips = world_size, accumulation, skips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        micro_step = self.start_step
        while True:
            step, i = divmod(micro_step, self.accumulation)
            yield sample_rank_batch(
                self.tokens, self.block_size, self.batch_size, self.seed, self.rank,
                self.skips.data_step(step) * self.accumulation + i, self.world_size, self.accumulation,
            )
            micro_step += 1


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
