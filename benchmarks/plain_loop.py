"""The yardstick: a minimal hand-written PyTorch training loop, nanoGPT style, for the same GPT and batches;
and, run as a script, nanoGPT's own CPU recipe for tiny-shakespeare, timed to a target val/loss.

PlainLoop: same network (nanogpt.model.GPT, same seed so the same initial weights), same batches
(nanogpt.data.sample_rank_batch from the same token placement), the same optimizer and schedule (nanogpt.training.optim: AdamW
or Muon beside it, cosine or warmup-stable-decay) and gradient clipping as GPTModule, and on a GPU the same bf16
autocast, fused AdamW and torch.compile. Nothing else: no logging, no checkpoints, no callbacks. throughput.py
compares our Lightning path against it.

    python benchmarks/plain_loop.py --corpus input.txt [--target-loss 1.886]

runs nanoGPT's README recipe (`train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`) the way its train.py does: 90/10 split of the characters, random batches,
AdamW at 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices), 100 warmup steps, cosine to 1e-4 at step 2000, clipping
at 1.0, no bias; estimate_loss over 20 random batches of each split every 250 steps and a checkpoint when val/loss
improves. It imports only torch, numpy and the network (no Lightning), like nanoGPT. With --target-loss it stops at
the first evaluation at or below it. Two differences, both in its favour: AdamW is fused on the CPU too, and it does
not print every step. Prints one JSON line: each evaluation's step, losses and seconds since main() began.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.training.optim import (
    OptimizerSettings,
    ScheduleLR,
    build_optimizer,
    build_schedule,
    parameter_roles,
    warmup_cosine,
)


@dataclass
class PlainSettings:
    """Everything the loop needs; throughput.py fills it from the resolved training config."""

    config: GPTConfig
    batch_size: int
    seed: int = 1337  # seeds the initial weights (seed_everything in train.py)
    data_seed: int = 1337  # seeds the batch sequence (data.seed)
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)  # GPTModule's optimizer and schedule
    max_steps: int = 5000  # where the schedule ends unless optim.decay_steps says otherwise
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
    model: GPT, s: PlainSettings, device: torch.device
) -> tuple[torch.optim.Optimizer, ScheduleLR]:
    """GPTModule's optimizer and schedule (nanogpt.training.optim), stepped once per optimizer step."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, parameter_roles(model, s.optim.optimizer), s.optim, device)
    return optimizer, build_schedule(optimizer, s.optim, s.max_steps)


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
        # here rather than at the top: nanogpt.data imports Lightning, which nanoGPT's recipe (main) must not pay for
        from nanogpt.data.blocks import sample_rank_batch

        self.sample_rank_batch = sample_rank_batch
        self.s, self.tokens, self.device = s, tokens, device
        torch.manual_seed(s.seed)
        model = GPT(s.config).to(device)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(model, s, device)
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
        x, y = self.sample_rank_batch(self.tokens, s.config.block_size, s.batch_size, s.data_seed, 0, self.steps_done)
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


@dataclass
class Recipe:
    """nanoGPT's CPU recipe for tiny-shakespeare (its README), with config/train_shakespeare_char.py under it."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    dropout: float = 0.0
    bias: bool = False
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    max_iters: int = 2000
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337


def get_batch(data: np.ndarray, r: Recipe, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: batch_size random blocks of the split, inputs and next-character targets, (B, T) each."""
    ix = torch.randint(len(data) - r.block_size, (r.batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i : i + r.block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + r.block_size].astype(np.int64)) for i in ix])
    return x, y


def run_recipe(text: str, r: Recipe, target_loss: Optional[float], out_dir: Path) -> dict:
    """Trains as nanoGPT's train.py does, evaluating every eval_interval steps (step 0 included) and after the last."""
    start = time.perf_counter()
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    data = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    torch.manual_seed(r.seed)
    generator = torch.Generator().manual_seed(r.seed)
    config = GPTConfig(vocab_size=len(chars), block_size=r.block_size, n_layer=r.n_layer, n_head=r.n_head,
                       n_embd=r.n_embd, dropout=r.dropout, bias=r.bias)
    model = GPT(config)
    params = [p for p in model.parameters() if p.requires_grad]
    # nanoGPT's configure_optimizers makes the same two AdamW groups: decay on tensors of two or more dims only
    adamw = OptimizerSettings(learning_rate=r.learning_rate, min_lr=r.min_lr, weight_decay=r.weight_decay,
                              beta1=r.beta1, beta2=r.beta2)
    optimizer = build_optimizer(list(model.named_parameters()), parameter_roles(model, "adamw"), adamw,
                                torch.device("cpu"))

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        losses = {}
        for split, split_data in splits.items():
            losses[split] = sum(model(*get_batch(split_data, r, generator))[1].item()
                                for _ in range(r.eval_iters)) / r.eval_iters
        model.train()
        return losses

    evals: list[dict] = []
    best_val, reached = float("inf"), None
    x, y = get_batch(splits["train"], r, generator)
    for step in range(r.max_iters + 1):
        lr = r.learning_rate * warmup_cosine(step, r.warmup_iters, r.lr_decay_iters, r.min_lr / r.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % r.eval_interval == 0 or step == r.max_iters:
            losses = estimate_loss()
            if losses["val"] < best_val and step > 0:
                best_val = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": step},
                           out_dir / "ckpt.pt")
            evals.append({"step": step, "train": round(losses["train"], 4), "val": round(losses["val"], 4),
                          "s": round(time.perf_counter() - start, 3)})
            if target_loss is not None and losses["val"] <= target_loss:
                reached = evals[-1]
                break
            if step == r.max_iters:
                break
        _, loss = model(x, y)
        x, y = get_batch(splits["train"], r, generator)  # nanoGPT fetches the next batch while the GPU works
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"recipe": "nanoGPT shakespeare_char, CPU", "target": target_loss, "reached": reached,
            "final_val": evals[-1]["val"], "steps": evals[-1]["step"], "evals": evals,
            "wall_s": round(time.perf_counter() - start, 3)}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="nanoGPT's CPU recipe for tiny-shakespeare, timed to a target val/loss")
    p.add_argument("--corpus", required=True, help="tiny-shakespeare's input.txt")
    p.add_argument("--target-loss", type=float, default=None, help="stop at the first evaluation at or below this")
    p.add_argument("--max-iters", type=int, default=Recipe.max_iters, help="steps (the schedule ends there too)")
    args = p.parse_args(argv)
    recipe = Recipe(max_iters=args.max_iters, lr_decay_iters=args.max_iters)
    with tempfile.TemporaryDirectory(prefix="nanogpt-plain-") as out_dir:
        result = run_recipe(Path(args.corpus).read_text(encoding="utf-8"), recipe, args.target_loss, Path(out_dir))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
