"""Framework cost per training step as a count: Python function calls per step, our path against the plain loop.

    python benchmarks/step_calls.py --config configs/shakespeare_char_cpu.yaml [--steps 50] [--warmup 20]

Wall-clock ratios on a shared machine swing by more than the cost they look for; the number of Python calls a
step makes (functions, and built-ins called from Python: what the interpreter spends its per-step time on while
the tensor kernels run the same on both sides) is the same on every run. Counted with sys.setprofile over --steps
steps after --warmup, non-logging and logging steps alike, for ours (train.py's CLI, trainer.fit) and for
benchmarks/plain_loop.py; validation is left out of the window. Prints a table of where ours makes its calls, then one
JSON line: {"ours_calls_per_step", "plain_calls_per_step", "extra_calls_per_step", "by_package": {...}, ...}.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import warnings
from typing import Any, Optional

import lightning as L
import torch

import throughput
from plain_loop import train_plain


class CallCounter:
    """Counts the calls made while on, by the package of the code that makes them (its file)."""

    PACKAGES = ("nanogpt", "lightning", "torch", "tqdm", "tensorboard", "numpy")

    def __init__(self) -> None:
        self.by_package: collections.Counter[str] = collections.Counter()

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            path = frame.f_code.co_filename
            package = next((p for p in self.PACKAGES if f"/{p}/" in path), "other")
            self.by_package[package] += 1

    def start(self) -> None:
        sys.setprofile(self._profile)

    def stop(self) -> None:
        sys.setprofile(None)

    @property
    def total(self) -> int:
        return sum(self.by_package.values())


class _Window(L.Callback):
    """Counts from the end of optimizer step `warmup` to the end of step `warmup + steps`, validation aside."""

    def __init__(self, counter: CallCounter, warmup: int, steps: int) -> None:
        self.counter, self.warmup, self.steps = counter, warmup, steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        if trainer.global_step == self.warmup:
            self.counter.start()
        elif trainer.global_step == self.warmup + self.steps:
            self.counter.stop()

    def on_validation_start(self, *args: Any) -> None:
        sys.setprofile(None)

    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.warmup < trainer.global_step < self.warmup + self.steps:
            self.counter.start()


def count_ours(args: argparse.Namespace, config_args: list[str]) -> CallCounter:
    counter = CallCounter()
    with tempfile.TemporaryDirectory(prefix="nanogpt-calls-") as run_dir:
        cli = throughput.build_cli(args, config_args, run_dir)
        cli.trainer.callbacks.append(_Window(counter, args.warmup, args.steps))
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            counter.stop()
    return counter


def count_plain(args: argparse.Namespace, config_args: list[str]) -> CallCounter:
    counter = CallCounter()

    def on_step(step: int) -> None:
        if step == args.warmup:
            counter.start()
        elif step == args.warmup + args.steps:
            counter.stop()

    settings, tokens, device, _ = throughput.plain_setup(args, config_args)
    try:
        train_plain(settings, tokens, device, steps=args.steps, warmup=args.warmup, on_step=on_step)
    finally:
        counter.stop()
    return counter


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=50, help="counted optimizer steps")
    p.add_argument("--warmup", type=int, default=20, help="steps before them")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    args, config_args = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

    ours, plain = count_ours(args, config_args), count_plain(args, config_args)
    per_step = {side: c.total / args.steps for side, c in (("ours", ours), ("plain", plain))}
    print(f"{'package':>12} {'ours':>8} {'plain':>8}  (calls per step)")
    for package in CallCounter.PACKAGES + ("other",):
        print(f"{package:>12} {ours.by_package[package] / args.steps:8.1f} {plain.by_package[package] / args.steps:8.1f}")
    print(json.dumps({
        "ours_calls_per_step": round(per_step["ours"], 1),
        "plain_calls_per_step": round(per_step["plain"], 1),
        "extra_calls_per_step": round(per_step["ours"] - per_step["plain"], 1),
        "by_package": {k: round(v / args.steps, 1) for k, v in sorted(ours.by_package.items())},
        "plain_by_package": {k: round(v / args.steps, 1) for k, v in sorted(plain.by_package.items())},
        "config": args.config, "config_args": config_args, "steps": args.steps, "warmup": args.warmup,
        "device": args.device,
    }))


if __name__ == "__main__":
    main()
