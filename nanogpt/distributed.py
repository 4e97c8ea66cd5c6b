"""Training on many devices: global-batch arithmetic and the DDP and FSDP strategies we run with.

A config states the global batch (sequences per optimizer step, over all devices and micro-steps); the
per-device micro-batch and the gradient accumulation follow from the world size, so one config trains
the same model with the same learning-rate schedule on 1, 2 or 8 devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from nanogpt.errors import NanoGPTError
from nanogpt.lightning_private import ddp_kwargs
from nanogpt.model import Block

# DDP settings that cost nothing: every parameter gets a gradient at every step, so DDP need not search
# the graph for unused ones; gradient buckets as views save a copy of every gradient. (Lightning already
# skips the gradient all-reduce on accumulation micro-steps through DDP's no_sync.)
DDP_DEFAULTS: dict[str, Any] = {"find_unused_parameters": False, "gradient_as_bucket_view": True}


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: global_batch = micro_batch * world_size * accumulation."""

    global_batch: int  # sequences per optimizer step, over all devices
    micro_batch: int  # sequences per forward/backward on one device
    accumulation: int  # micro-steps per optimizer step
    world_size: int  # processes (devices x nodes)

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.world_size} device(s) "
            f"x {self.accumulation} accumulation step(s)"
        )


def _multiples(n: int, of: int) -> str:
    """The multiples of `of` nearest to n, for a hint."""
    lo = of * max(1, n // of)
    return f"e.g. {lo} or {lo + of}"


def plan_batch(
    global_batch: int, world_size: int, micro_batch: Optional[int] = None, accumulation: Optional[int] = None
) -> BatchPlan:
    """Splits a global batch over world_size devices, given the micro-batch or the accumulation (or neither).

    With neither, each device takes global_batch / world_size sequences in one micro-step.
    Raises NanoGPTError, naming the config keys, when the numbers do not divide.
    """
    if global_batch < 1:
        raise NanoGPTError(f"data.batch_size (the global batch) must be a positive integer, got {global_batch}")
    if world_size < 1:
        raise NanoGPTError(f"the world size must be at least 1, got {world_size}")
    if micro_batch is not None and micro_batch < 1:
        raise NanoGPTError(f"data.micro_batch_size must be a positive integer, got {micro_batch}")
    if accumulation is not None and accumulation < 1:
        raise NanoGPTError(f"trainer.accumulate_grad_batches must be a positive integer, got {accumulation}")
    accumulation = accumulation or 1
    if micro_batch is None:
        per_step = world_size * accumulation
        if global_batch % per_step:
            over = f"{world_size} device(s)" + (f" x {accumulation} accumulation steps" if accumulation > 1 else "")
            raise NanoGPTError(
                f"data.batch_size {global_batch} (the global batch) does not split evenly over {over}; "
                f"set --data.batch_size to a multiple of {per_step} ({_multiples(global_batch, per_step)})"
            )
        return BatchPlan(global_batch, global_batch // per_step, accumulation, world_size)
    per_step = micro_batch * world_size
    if global_batch % per_step:
        fits = [m for m in range(1, global_batch // world_size + 1) if global_batch % (m * world_size) == 0]
        hint = f"set --data.micro_batch_size to one of {fits[-6:]}, or " if fits else ""
        raise NanoGPTError(
            f"data.batch_size {global_batch} (the global batch) is not a multiple of data.micro_batch_size "
            f"{micro_batch} x {world_size} device(s) = {per_step}; {hint}set --data.batch_size to a multiple of "
            f"{per_step} ({_multiples(global_batch, per_step)})"
        )
    derived = global_batch // per_step
    if accumulation not in (1, derived):
        raise NanoGPTError(
            f"trainer.accumulate_grad_batches {accumulation} disagrees with data.batch_size {global_batch} / "
            f"(data.micro_batch_size {micro_batch} x {world_size} device(s)) = {derived}; leave "
            "accumulate_grad_batches unset, it is derived from the batch sizes"
        )
    return BatchPlan(global_batch, micro_batch, derived, world_size)


def all_reduce(tensor: torch.Tensor, op: Literal["mean", "min"], strategy: Any) -> torch.Tensor:
    """tensor reduced over all ranks, as a new tensor (a collective: every rank calls it at the same point).

    Lightning's strategy.reduce puts a barrier before each all-reduce; on NCCL a barrier blocks the host until the GPU
    has run everything queued, a host-device sync on top of the one that reading the result costs. This one
    all-reduces at once. Without torch.distributed set up (another kind of strategy) the strategy reduces.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return strategy.reduce(tensor.clone(), reduce_op=op)
    out = tensor.clone()
    if op == "mean":  # a sum divided: gloo has no AVG
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def apply_ddp_defaults(strategy: Any) -> None:
    """Gives a DDPStrategy (named "ddp", chosen by "auto", or a class_path) the DDP_DEFAULTS.

    Lightning keeps the DistributedDataParallel kwargs until fit wraps the model (no public API reaches them for
    a strategy built from a name: see lightning_private). A find_unused_parameters the user set is kept. gradient_as_bucket_view is always turned on: for a
    class_path strategy jsonargparse fills in DDP's own default (False), so a False there is no choice.
    """
    if isinstance(strategy, DDPStrategy):
        kwargs = ddp_kwargs(strategy)
        kwargs.setdefault("find_unused_parameters", DDP_DEFAULTS["find_unused_parameters"])
        kwargs["gradient_as_bucket_view"] = DDP_DEFAULTS["gradient_as_bucket_view"]


class GPTFSDPStrategy(FSDPStrategy):
    """FSDP for GPT models too big for one GPU: each transformer Block is its own FSDP unit.

    Args:
        sharding_strategy: FULL_SHARD (parameters, gradients and optimizer state sharded), SHARD_GRAD_OP
            (parameters kept whole between forward and backward: faster, more memory), or HYBRID_SHARD
            (full sharding within a node, replication across nodes).
        activation_checkpointing: recompute each Block's activations in backward instead of storing them.
        cpu_offload: keep sharded parameters in CPU memory between uses (slow; for the largest models).
        state_dict_type: "full" writes ordinary checkpoints on rank 0 (sample.py reads them);
            "sharded" writes one shard per rank into a checkpoint directory (faster for huge models).
        **kwargs: passed on to lightning's FSDPStrategy.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            **kwargs,
        )
        self.activation_checkpointing = activation_checkpointing
