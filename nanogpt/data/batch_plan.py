"""The global batch, split over devices: global_batch = micro_batch x world_size x accumulation.

A config states the global batch (sequences per optimizer step, over all devices and micro-steps); the
per-device micro-batch and the gradient accumulation follow from the world size, so one config trains
the same model with the same learning-rate schedule on 1, 2 or 8 devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nanogpt.errors import NanoGPTError


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
