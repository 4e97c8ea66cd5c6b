"""Training on many devices: the DDP and FSDP strategies we run with, and a collective that works under both."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from nanogpt.private import ddp_kwargs
from nanogpt.model import Block

# DDP settings that cost nothing: every parameter gets a gradient at every step, so DDP need not search
# the graph for unused ones; gradient buckets as views save a copy of every gradient. (Lightning already
# skips the gradient all-reduce on accumulation micro-steps through DDP's no_sync.)
DDP_DEFAULTS: dict[str, Any] = {"find_unused_parameters": False, "gradient_as_bucket_view": True}


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
