"""The yardstick: a minimal hand-written PyTorch training loop, nanoGPT style, for the same GPT and batches.

Same network (nanogpt.model.GPT, same seed so the same initial weights), same batches (nanogpt.data.sample_rank_batch
from the same token placement), same AdamW parameter groups, warmup + cosine schedule and gradient clipping as
GPTModule, and on a GPU the same bf16 autocast, fused AdamW and torch.compile. Nothing else: no logging, no
checkpoints, no callbacks. throughput.py compares our Lightning path against it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Union

import numpy as np
import torch

from nanogpt.data import sample_rank_batch
from nanogpt.model import GPT, GPTConfig
from nanogpt.module import warmup_cosine


@dataclass
class PlainSettings:
    """Everything the loop needs; throughput.py fills it from the resolved training config."""

    config: GPTConfig
    batch_size: int
    seed: int = 1337  # seeds the initial weights (seed_everything in train.py)
    data_seed: int = 1337  # seeds the batch sequence (data.seed)
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    bf16: bool = False  # autocast to bfloat16 (Lightning's "bf16-mixed")
    compile: bool = False


@dataclass
class PlainResult:
    steps: int  # timed steps
    seconds: float  # wall time of the timed steps
    cpu_seconds: float  # this process's CPU time over them
    tokens_per_s: float
    final_loss: float
    step_ends: list[float]  # wall time at the start of the timed steps and at the end of each (timed_run.step_windows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_and_schedule(
    params: list[torch.nn.Parameter], s: PlainSettings, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """GPTModule's AdamW (decay on matrices and embeddings only, fused wherever torch has the kernel: CPU and CUDA)
    and its warmup + cosine schedule, stepped once per optimizer step."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), fused=fused)
    schedule = partial(
        warmup_cosine, warmup_steps=s.warmup_steps, decay_steps=s.decay_steps, min_ratio=s.min_lr / s.learning_rate
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class PlainLoop:
    """The loop itself: building it makes the model, optimizer and schedule; step() runs one optimizer step.

    An object rather than one function, so throughput.py --interleave can run it in short stretches between our
    Lightning steps.
    """

    def __init__(
        self,
        s: PlainSettings,
        tokens: Union[np.ndarray, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.s, self.tokens, self.device = s, tokens, device
        torch.manual_seed(s.seed)
        model = GPT(s.config).to(device)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, s, device)
        self.forward = torch.compile(model, dynamic=False) if s.compile else model
        # exactly Lightning's "bf16-mixed" context, weight-cast cache off included: under torch.compile the cache
        # setting is part of the graph's guards, so a different one would compile another graph than ours
        self.autocast = (
            partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
            if s.bf16
            else contextlib.nullcontext
        )
        self.steps_done = 0

    def step(self) -> torch.Tensor:
        """One optimizer step; returns its loss."""
        s, device = self.s, self.device
        x, y = sample_rank_batch(self.tokens, s.config.block_size, s.batch_size, s.data_seed, 0, self.steps_done)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-ops when gathered there
        with self.autocast():
            _, loss = self.forward(x, y)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss


def train_plain(
    s: PlainSettings,
    tokens: Union[np.ndarray, torch.Tensor],
    device: torch.device,
    steps: int,
    warmup: int,
) -> PlainResult:
    """Trains for warmup + steps steps and times the last `steps` (warm-up and compilation excluded)."""
    loop = PlainLoop(s, tokens, device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    step_ends: list[float] = []
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
            step_ends.append(t0)
        loss = loop.step()
        if step >= warmup:
            step_ends.append(time.perf_counter())
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    tokens_per_s = steps * s.batch_size * s.config.block_size / seconds
    return PlainResult(steps, seconds, cpu_seconds, tokens_per_s, loss.item(), step_ends)
