"""Where a training step's time goes, phase by phase, in our Lightning path and in the plain loop.

    python benchmarks/step_phases.py --config configs/shakespeare_char_cpu.yaml [--steps 200] [--repeats 4]

Each step is cut at the same four points on both sides: the batch is ready (ours: on_train_batch_start; plain:
after sampling it), the forward pass ends (on_before_backward), the backward pass ends (on_after_backward), and
the step ends (on_train_batch_end; plain: after zero_grad). So a step's phases are
  between   the previous step's end to this batch being ready: ours' batch-end hooks, the LR scheduler step,
            the data fetch and transfer, batch-start hooks; plain: sampling the batch
  forward   the training step up to the loss (ours also runs Lightning's optimizer and closure machinery first)
  backward  loss.backward()
  update    clipping, the non-finite guard, AdamW, zero_grad (plain: and its scheduler step)
The median of each phase over the timed steps that are not logging steps (step_budget.py prices those), in
alternating runs whose order flips each repeat, then the median over runs. No validation in the window.
Prints a table, then one JSON line: {"ours_ms": {...}, "plain_ms": {...}, "extra_ms": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any, Optional

import lightning as L
import torch

import throughput
from plain_loop import PlainLoop
from timing import quiet_lightning, step_bench_parser

PHASES = ("between", "forward", "backward", "update", "step")
_CUTS = ("batch", "forward", "backward", "end")  # the marks, in step order


class PhaseClock:
    """Collects (mark, time) pairs and turns them into per-step phase durations."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def phases(self, first: int, skip: set[int]) -> dict[str, list[float]]:
        """Durations of steps `first`.. (counted from 1; each step runs from one "end" mark to the next), without
        the steps in `skip`."""
        ends = [i for i, (name, _) in enumerate(self.marks) if name == "end"]
        out: dict[str, list[float]] = {p: [] for p in PHASES}
        for step, (a, b) in enumerate(zip(ends, ends[1:]), start=1):  # step `step` runs from end a to end b
            if step < first or step in skip:
                continue
            t = {name: at for name, at in self.marks[a + 1: b + 1]}
            if set(t) != set(_CUTS):
                continue  # e.g. a micro-batch of gradient accumulation: not a whole step
            start = self.marks[a][1]
            out["between"].append(t["batch"] - start)
            out["forward"].append(t["forward"] - t["batch"])
            out["backward"].append(t["backward"] - t["forward"])
            out["update"].append(t["end"] - t["backward"])
            out["step"].append(t["end"] - start)
        return out


class _Marks(L.Callback):
    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock

    def on_train_start(self, *args: Any) -> None:
        self.clock("end")  # where step 1 starts

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock("batch")

    def on_before_backward(self, *args: Any) -> None:
        self.clock("forward")

    def on_after_backward(self, *args: Any) -> None:
        self.clock("backward")

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock("end")


def _medians(phases: dict[str, list[float]]) -> dict[str, float]:
    return {p: 1e3 * statistics.median(v) for p, v in phases.items()}


def run_ours(args: argparse.Namespace, config_args: list[str]) -> dict[str, float]:
    clock = PhaseClock()
    with tempfile.TemporaryDirectory(prefix="nanogpt-phases-") as run_dir:
        cli = throughput.build_cli(args, [*config_args, "--trainer.val_check_interval", str(10**9)], run_dir)
        cli.trainer.callbacks.append(_Marks(clock))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        every = cli.trainer.log_every_n_steps
    # step k (from 1) logs when k % every == 0: its scalars are read in its forward phase and written after its
    # end mark (the module's on_train_batch_end runs after the callbacks'), in step k + 1's "between"
    logged = {k + d for k in range(every, args.warmup + args.steps + 1, every) for d in (0, 1)}
    return _medians(clock.phases(args.warmup + 1, logged))


def run_plain(args: argparse.Namespace, config_args: list[str]) -> dict[str, float]:
    settings, tokens, device, _ = throughput.plain_setup(args, config_args)
    clock = PhaseClock()
    loop = PlainLoop(settings, tokens, device, mark=clock)
    clock("end")  # the start of step 1
    for _ in range(args.warmup + args.steps):
        loop.step()
        clock("end")
    return _medians(clock.phases(args.warmup + 1, set()))


def main(argv: Optional[list[str]] = None) -> None:
    p = step_bench_parser(__doc__, 200, "timed steps per run")
    p.add_argument("--repeats", type=int, default=4, help="runs of each side, alternating")
    args, config_args = p.parse_known_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps must be at least 2, --repeats positive and --warmup not negative")
    quiet_lightning()

    runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
    for i in range(args.repeats):
        for side, run in (("ours", run_ours), ("plain", run_plain))[:: 1 if i % 2 == 0 else -1]:
            runs[side].append(run(args, config_args))
            print(f"run {i + 1}/{args.repeats} {side:>5}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in runs[side][-1].items()),
                  flush=True)
    med = {side: {ph: round(statistics.median(r[ph] for r in rs), 3) for ph in PHASES} for side, rs in runs.items()}
    extra = {ph: round(med["ours"][ph] - med["plain"][ph], 3) for ph in PHASES}
    print(f"\n{'phase':>9} {'ours ms':>9} {'plain ms':>9} {'extra ms':>9}")
    for ph in PHASES:
        print(f"{ph:>9} {med['ours'][ph]:9.3f} {med['plain'][ph]:9.3f} {extra[ph]:+9.3f}")
    print(json.dumps({"ours_ms": med["ours"], "plain_ms": med["plain"], "extra_ms": extra, "config": args.config,
                      "config_args": config_args, "steps": args.steps, "warmup": args.warmup,
                      "repeats": args.repeats, "device": args.device, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
