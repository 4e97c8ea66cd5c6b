"""A real train.py run, timed from the inside: step time, validation pauses, and the time to a target val/loss;
or the time to a target val/loss of train.py against nanoGPT's recipe, each from process start.

    python benchmarks/timed_run.py --config configs/shakespeare_char_cpu.yaml --target-loss 1.886  # ours vs nanoGPT
    python benchmarks/timed_run.py --config configs/shakespeare_char.yaml --target-loss 1.47 --stop-at-target
    python benchmarks/timed_run.py --config configs/shakespeare_char.yaml --steps 6 --val-every 3  # a short probe

Time to loss (--target-loss without --stop-at-target, --steps or --val-every): `python train.py --config CONFIG`
(plus any other arguments, and Lightning's EarlyStopping with stopping_threshold = the target, so the run ends at
the first validation below it) and `python benchmarks/plain_loop.py` (nanoGPT's CPU recipe, run to its end so that
its final val/loss is checked too), each a fresh process timed from its start: ours to its exit, nanoGPT's to its
first evaluation at or below the target; taking turns for --rounds rounds (the order alternates). A side that never
reaches the target reports its whole run, flagged (`ours_reached`, `plain_reached`): for nanoGPT that is a lower
bound on its time, so the ratio errs in its favour. Prints one JSON line: {"target", "ours_s", "plain_s", "ratio",
"ours_steps", "plain_steps", ...} (medians over the rounds; ratio = ours_s / plain_s).

The other two forms run train.py's path in this process:

A validation pause is the validation loop plus what a run does after it: the monitor's text sample and the
checkpoint saves. The share of wall time spent in them is measured on the run itself, and also projected onto the
config's own schedule (its max_steps and val_check_interval) from the measured step time and pause: a short probe
on a slow machine still tells what share validation takes in the full run. Each pause is also split: the time in
the text sample (`sample_s`) and in the checkpoint callback (`checkpoint_s`) are timed per validation, and the
`val_loop_share_*` figures leave both out. Any other argument (--model.*, --data.*, --trainer.*) goes to the
training config. Prints one JSON line.

RunTimer, the callback that clocks the run without a device sync per step, also clocks our side in throughput.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from nanogpt.training.cli import GPTLightningCLI
from nanogpt.errors import NanoGPTError
from nanogpt.training.metrics import TrainingMonitor
from nanogpt.data.sources import tinyshakespeare_path


def sync_device(module: L.LightningModule) -> None:
    """Waits for the module's queued GPU work (a no-op on a CPU)."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class RunTimer(L.Callback):
    """Splits a run's wall time into training and validation, and notes when val/loss first reaches a target.

    Training time runs from the end of optimizer step `warmup` (first-step and compile costs excluded) to the
    end of the last step, leaving out every validation pause: the validation loop and the checkpoint saves
    after it, up to the next training batch. Syncs the device only at those boundaries, never per step.
    """

    def __init__(self, warmup: int = 0, target_loss: Optional[float] = None, stop_at_target: bool = False) -> None:
        self.warmup = warmup
        self.target_loss = target_loss
        self.stop_at_target = stop_at_target
        self.run_start: Optional[float] = None  # on_train_start
        self.t0: Optional[float] = None  # end of step `warmup`
        self.train_seconds = 0.0  # timed training, validation pauses excluded
        self.train_cpu_seconds = 0.0  # the same span in this process's CPU time (steadier on a busy machine)
        self.timed_steps = 0
        self.total_seconds = 0.0  # on_train_start to on_train_end
        self.val_pauses: list[float] = []  # one per validation: loop + checkpoint saves
        self.final_loss: Optional[float] = None
        # the training clock (validation pauses taken out) at the end of step `warmup` and of every step after it:
        # step_windows() cuts it into windows of equal steps
        self.step_ends: list[float] = []
        self.reached: Optional[dict[str, float]] = None  # step and times at which val/loss <= target_loss
        self._last_end: Optional[float] = None
        self._ends_step = 0
        self._pause_start: Optional[float] = None
        self._val_in_window = 0.0
        self._cpu0 = time.process_time()
        self._cpu_pause_start = 0.0
        self._cpu_val_in_window = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync_device(pl_module)
        self.run_start = time.perf_counter()
        if self.warmup == 0:
            self.t0, self._cpu0 = self.run_start, time.process_time()
            self.step_ends.append(self.t0)  # where step 1 starts

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._end_pause(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done, this one included
        if self.t0 is None and step >= self.warmup:
            sync_device(pl_module)
            self.t0 = time.perf_counter()
            self._cpu0 = time.process_time()
            self._val_in_window = 0.0
            self._cpu_val_in_window = 0.0
            self._ends_step = step
            self.step_ends.append(self.t0)
        elif self.t0 is not None and self.final_loss is None and step > self._ends_step:  # a step ended (not a
            self._ends_step = step  # micro-batch of one); no sync: over a window the device's queue evens out
            self.step_ends.append(time.perf_counter() - self._val_in_window)
        if step >= trainer.max_steps > 0:
            sync_device(pl_module)
            self._finish(time.perf_counter(), step, outputs)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        sync_device(pl_module)  # pending training kernels belong to training, not validation
        self._pause_start = time.perf_counter()
        self._cpu_pause_start = time.process_time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.target_loss is None or self.reached is not None:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and float(loss) <= self.target_loss:
            now = time.perf_counter()
            self.reached = {
                "step": trainer.global_step,
                "wall_s": now - self.run_start,  # everything since training started: compile, validations
                "train_s": now - self.run_start - sum(self.val_pauses) - (now - self._pause_start),
            }
            if self.stop_at_target:
                trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_pause(pl_module)
        now = time.perf_counter()
        self._finish(now, trainer.global_step, None)  # a run stopped before max_steps (e.g. at its target)
        self.total_seconds = now - self.run_start

    def _end_pause(self, pl_module: L.LightningModule) -> None:
        if self._pause_start is None:
            return
        sync_device(pl_module)
        pause = time.perf_counter() - self._pause_start
        cpu_pause = time.process_time() - self._cpu_pause_start
        self._pause_start = None
        self.val_pauses.append(pause)
        if self.t0 is not None and self.final_loss is None:
            self._val_in_window += pause
            self._cpu_val_in_window += cpu_pause

    def _finish(self, now: float, step: int, outputs: Any) -> None:
        if self.final_loss is not None or self.t0 is None:
            return
        self.timed_steps = step - self.warmup
        self.train_seconds = now - self.t0 - self._val_in_window
        self.train_cpu_seconds = time.process_time() - self._cpu0 - self._cpu_val_in_window
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.final_loss = float(loss) if loss is not None else float("nan")


def step_windows(step_ends: list[float], every: int) -> list[float]:
    """The seconds of each run of `every` consecutive steps, from a list of step-end times (non-overlapping).

    With `every` = log_every_n_steps each window holds exactly one logging step, so the windows' median is a
    step time that counts logging's cost but not a neighbour's burst on a shared machine.
    """
    return [step_ends[i + every] - step_ends[i] for i in range(0, len(step_ends) - every, every)]


def quiet_lightning() -> None:
    """Lightning's info lines and the CLI's args warning off: a benchmark's table is its output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are passed on purpose


def clock_calls(obj: Any, name: str, times: list[float], trainer: L.Trainer) -> None:
    """Wraps the method `name` of this one object so that the wall time of each call outside the sanity check,
    the device's queued work included, is appended to times."""
    method = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if trainer.sanity_checking:
            return method(*args, **kwargs)
        sync_device(trainer.lightning_module)
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            sync_device(trainer.lightning_module)
            times.append(time.perf_counter() - start)

    setattr(obj, name, timed)


def without(pauses: list[float], *parts: list[float]) -> list[float]:
    """Each pause less its parts; a part timed at other than every validation (a sample turned off) is left in."""
    return [p - sum(part[i] for part in parts if len(part) == len(pauses)) for i, p in enumerate(pauses)]


ROOT = Path(__file__).resolve().parents[1]
PLAIN_ARGS: list[str] = []  # plain_loop.py's recipe as it is (tests shorten it)


def _ours(args: argparse.Namespace, config_args: list[str], run_dir: str) -> dict:
    """One `python train.py` run that ends at its first validation below the target: seconds, steps, best val/loss."""
    stop = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/loss", "stopping_threshold": args.target_loss, "patience": 10**9}}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config, *config_args,
           "--trainer.default_root_dir", run_dir, "--trainer.callbacks+", json.dumps(stop)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise NanoGPTError(f"train.py failed: {done.stderr.strip().splitlines()[-1:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    val = [(e.step + 1, e.value) for e in events.Scalars("val/loss")]  # logged at the step's index, from 0
    return {"s": seconds, "steps": val[-1][0], "val": round(val[-1][1], 4), "reached": val[-1][1] < args.target_loss}


def _plain(args: argparse.Namespace, corpus: str) -> dict:
    """One `python benchmarks/plain_loop.py` run of nanoGPT's whole recipe (2000 steps): the seconds from process
    start to its first evaluation at or below the target, and its val/loss at the end."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--corpus", corpus, *PLAIN_ARGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise NanoGPTError(f"plain_loop.py failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reached = next((e for e in result["evals"] if e["val"] <= args.target_loss), None)
    # the evaluations' times count from main(); what the process spent after the one that reached it is left out
    to_target = seconds - (result["wall_s"] - reached["s"]) if reached else seconds
    return {"s": to_target, "steps": reached["step"] if reached else result["steps"], "val_at_end": result["final_val"],
            "reached": reached is not None}


def time_to_loss(args: argparse.Namespace, config_args: list[str]) -> dict:
    """Ours and nanoGPT's recipe to the target, each from process start, in alternating order, args.rounds times."""
    corpus = args.corpus or str(tinyshakespeare_path())
    if not Path(corpus).is_file():
        raise NanoGPTError(f"no tiny-shakespeare at {corpus}: train once to download it, or pass --corpus")
    rounds = []
    for i in range(args.rounds):
        row = {}
        for side in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
            with tempfile.TemporaryDirectory(prefix="nanogpt-ttl-") as run_dir:
                row[side] = _ours(args, config_args, run_dir) if side == "ours" else _plain(args, corpus)
        rounds.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # each round as it ends (stdout keeps the one line)

    def median(side: str, key: str) -> float:
        return round(statistics.median(r[side][key] for r in rounds), 2)

    return {
        "target": args.target_loss,
        "ours_s": median("ours", "s"),
        "plain_s": median("plain", "s"),
        "ratio": round(statistics.median(r["ours"]["s"] / r["plain"]["s"] for r in rounds), 3),
        "ours_steps": median("ours", "steps"),
        "plain_steps": median("plain", "steps"),
        "ours_reached": all(r["ours"]["reached"] for r in rounds),
        "plain_reached": all(r["plain"]["reached"] for r in rounds),
        "config": args.config,
        "config_args": config_args,
        "rounds": rounds,
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the config's)")
    p.add_argument("--val-every", type=int, default=None, help="validate every n steps (default: the config's)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the mean step time")
    p.add_argument("--target-loss", type=float, default=None, help="note when val/loss first reaches this")
    p.add_argument("--stop-at-target", action="store_true", help="end the run there")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=int, default=1, help="time to loss: runs of each side, taking turns")
    p.add_argument("--corpus", default=None, help="time to loss: tiny-shakespeare's input.txt for nanoGPT's recipe "
                                                  "(default: the data cache's)")
    args, config_args = p.parse_known_args(argv)
    if args.target_loss is not None and not (args.stop_at_target or args.steps or args.val_every):
        try:
            print(json.dumps(time_to_loss(args, config_args)))
        except NanoGPTError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    quiet_lightning()

    try:
        with tempfile.TemporaryDirectory(prefix="nanogpt-timed-") as run_dir:
            base = ["--config", args.config, *config_args, "--trainer.accelerator", device, "--trainer.devices", "1",
                    "--trainer.default_root_dir", run_dir]
            configured = GPTLightningCLI(base).trainer  # the config's own schedule
            full_steps, full_every = configured.max_steps, int(configured.val_check_interval)
            overrides = []
            if args.steps:
                overrides += ["--trainer.max_steps", str(args.steps)]
            if args.val_every:
                overrides += ["--trainer.val_check_interval", str(args.val_every)]
            cli = GPTLightningCLI(base + overrides)
            timer = RunTimer(warmup=args.warmup, target_loss=args.target_loss, stop_at_target=args.stop_at_target)
            cli.trainer.callbacks.append(timer)
            sample_s: list[float] = []
            per_checkpoint_s: list[list[float]] = []  # one list per checkpoint callback (best, step, last files)
            for callback in cli.trainer.callbacks:
                if isinstance(callback, TrainingMonitor):
                    clock_calls(callback, "generate_sample", sample_s, cli.trainer)
                elif isinstance(callback, Checkpoint):
                    per_checkpoint_s.append([])
                    clock_calls(callback, "on_validation_end", per_checkpoint_s[-1], cli.trainer)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            checkpoint_s = [sum(times) for times in zip(*per_checkpoint_s)]  # each validation's checkpoint writes
    except NanoGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    step_s = timer.train_seconds / max(1, timer.timed_steps)
    pauses = timer.val_pauses
    loops = without(pauses, sample_s, checkpoint_s)
    n_val = full_steps // full_every

    def share_at_config_schedule(times: list[float]) -> float:
        """The share of wall time pauses like these take over the config's schedule: max_steps steps with a
        validation every val_check_interval steps. The first pause also pays one-off costs (compiling the eval
        graph), so the steady state is the median of the later ones."""
        pause = statistics.median(times[1:] if len(times) > 1 else times) if times else 0.0
        return round(n_val * pause / (full_steps * step_s + n_val * pause), 4)

    result = {
        "config": args.config,
        "config_args": config_args,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "steps": cli.trainer.global_step,
        "step_s": round(step_s, 5),
        "val_pauses_s": [round(x, 4) for x in pauses],
        "wall_s": round(timer.total_seconds, 3),
        "val_share_measured": round(sum(pauses) / timer.total_seconds, 4),
        "val_share_at_config_schedule": share_at_config_schedule(pauses),
        "config_schedule": {"max_steps": full_steps, "val_check_interval": full_every},
        # the same for the validation loop alone: the text sample and the checkpoint saves left out
        "sample_s": [round(x, 4) for x in sample_s],
        "checkpoint_s": [round(x, 4) for x in checkpoint_s],
        "val_loop_share_measured": round(sum(loops) / timer.total_seconds, 4),
        "val_loop_share_at_config_schedule": share_at_config_schedule(loops),
        "target_loss": args.target_loss,
        "reached_target": timer.reached,
        "final_val_loss": float(cli.trainer.callback_metrics["val/loss"]) if "val/loss" in cli.trainer.callback_metrics else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
