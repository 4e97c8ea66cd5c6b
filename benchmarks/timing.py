"""A callback that times a real Trainer run from the inside, without adding a device sync to ordinary steps;
and what the per-step benchmarks share."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any, Optional

import lightning as L
import torch


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


def step_bench_parser(doc: str, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options step_budget.py, step_phases.py and lightning_floor.py share: --config, --steps, --warmup, --device."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p


def quiet_lightning() -> None:
    """Lightning's info lines and the CLI's args warning off: a benchmark's table is its output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are passed on purpose
