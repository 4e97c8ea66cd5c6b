"""Where ours spends time per step that the plain loop does not: logging steps and the non-finite guard, measured.

    python benchmarks/step_budget.py --config configs/shakespeare_char_cpu.yaml [--steps 300] [--rounds 60]

The plain loop neither logs nor guards; benchmarks/step_calls.py counts the rest (the framework's Python calls).
1. Logging steps: one real training run (train.py's CLI, no validation in the window). Each step is timed from one
   on_train_batch_start to the next; the median logging step (every trainer.log_every_n_steps) minus the median
   other step, divided by log_every_n_steps, is what logging adds to an average step.
2. The non-finite guard (nanogpt.fault.NonFiniteGuard): the end of a step (gradient norm and the fused AdamW step)
   bare, with the guard as this device runs it, and with the guard skipping bad steps on the device (a GPU's way:
   the fused AdamW gets a found_inf), on the config's model with its gradients, in rounds of 100 that alternate in
   one process, so drift hits all alike. (FaultTolerance reads the flags at logging steps: that is in part 1.)
Prints one JSON line: {"step_ms", "logging_step_extra_ms", "logging_ms_per_step", "guard_us_per_step",
"guard_on_device_us_per_step", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import lightning as L
import torch

import throughput
from nanogpt.fault import NonFiniteGuard
from timing import quiet_lightning, step_bench_parser


class StepClock(L.Callback):
    """The wall time of every step, from its on_train_batch_start to the next one's (rank 0, one process)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # optimizer step index (from 0) -> its wall time
        self._last: Optional[tuple[int, float]] = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            step, then = self._last
            self.seconds[step] = now - then
        self._last = (trainer.global_step, now)


def time_logging(args: argparse.Namespace, config_args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nanogpt-budget-") as run_dir:
        # validation outside the window: its pause would land in one step's time
        cli = throughput.build_cli(args, [*config_args, "--trainer.val_check_interval", str(10**9)], run_dir)
        clock = StepClock()
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        every = cli.trainer.log_every_n_steps
    timed = {s: t for s, t in clock.seconds.items() if s >= args.warmup}
    logging_steps = [t for s, t in timed.items() if (s + 1) % every == 0]  # as Lightning counts them
    others = [t for s, t in timed.items() if (s + 1) % every]
    extra = statistics.median(logging_steps) - statistics.median(others)
    return {"step_ms": round(1e3 * statistics.median(others), 3), "logging_step_extra_ms": round(1e3 * extra, 3),
            "logging_ms_per_step": round(1e3 * extra / every, 4), "log_every_n_steps": every,
            "logging_steps": len(logging_steps), "other_steps": len(others)}


def time_guard(args: argparse.Namespace, config_args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nanogpt-budget-") as run_dir:
        model = throughput.build_cli(args, config_args, run_dir).model.model.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    loss = torch.tensor(2.5, device=args.device)

    def optimizer_end(guard: Optional[NonFiniteGuard]) -> Callable[[], None]:
        # an optimizer of its own for each variant: a guard that skips on the device leaves its found_inf on it
        optimizer, step = torch.optim.AdamW(params, lr=1e-6, fused=True), [0]

        def run() -> None:
            if guard is not None:
                guard.see_loss(loss)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if guard is not None:
                guard.see_step(optimizer, norm, step[0])  # unread flags are folded on the device every 1024 steps
            step[0] += 1
            optimizer.step()
        return run

    variants = {"bare": optimizer_end(None), "guard": optimizer_end(NonFiniteGuard()),
                "guard_on_device": optimizer_end(NonFiniteGuard(skip_on_device=True))}

    def per_call(fn: Callable[[], None], n: int = 100) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    for fn in variants.values():  # warm every path (the guard's found_inf buffer, AdamW's state)
        per_call(fn, 20)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for r in range(args.rounds):
        for name, fn in order[:: 1 if r % 2 else -1]:
            times[name].append(per_call(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"optimizer_end_us": round(1e6 * median["bare"], 1),
            "guard_us_per_step": round(1e6 * (median["guard"] - median["bare"]), 1),
            "guard_on_device_us_per_step": round(1e6 * (median["guard_on_device"] - median["bare"]), 1)}


def main(argv: Optional[list[str]] = None) -> None:
    p = step_bench_parser(__doc__, 300, "timed steps of the training run")
    p.add_argument("--rounds", type=int, default=60, help="alternating rounds of 100 optimizer ends, each variant")
    args, config_args = p.parse_known_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--steps and --rounds must be positive and --warmup not negative")
    quiet_lightning()

    result = {**time_logging(args, config_args), **time_guard(args, config_args)}
    result.update(config=args.config, config_args=config_args, steps=args.steps, rounds=args.rounds,
                  device=args.device, threads=torch.get_num_threads())
    print(f"step {result['step_ms']:.2f} ms; a logging step {result['logging_step_extra_ms']:+.2f} ms "
          f"({result['logging_ms_per_step']:.3f} ms a step); the non-finite guard {result['guard_us_per_step']:.0f} us "
          f"a step ({result['guard_on_device_us_per_step']:.0f} us skipping on the device)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
