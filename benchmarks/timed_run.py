"""A real train.py run, timed from the inside: step time, validation pauses, and the time to a target val/loss.

    python benchmarks/timed_run.py --config configs/shakespeare_char.yaml --target-loss 1.47      # a full run
    python benchmarks/timed_run.py --config configs/shakespeare_char.yaml --steps 6 --val-every 3  # a short probe

A validation pause is the validation loop plus what a run does after it: the monitor's text sample and the
checkpoint saves. The share of wall time spent in them is measured on the run itself, and also projected onto the
config's own schedule (its max_steps and val_check_interval) from the measured step time and pause: a short probe
on a slow machine still tells what share validation takes in the full run. Each pause is also split: the time in
the text sample (`sample_s`) and in the checkpoint callback (`checkpoint_s`) are timed per validation, and the
`val_loop_share_*` figures leave both out. Any other argument (--model.*, --data.*, --trainer.*) goes to the
training config. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

import lightning as L
import torch

from nanogpt.callbacks import RunCheckpoint
from nanogpt.cli import GPTLightningCLI
from nanogpt.errors import NanoGPTError
from nanogpt.monitor import TrainingMonitor
from timing import RunTimer, sync_device


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


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the config's)")
    p.add_argument("--val-every", type=int, default=None, help="validate every n steps (default: the config's)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the mean step time")
    p.add_argument("--target-loss", type=float, default=None, help="note when val/loss first reaches this")
    p.add_argument("--stop-at-target", action="store_true", help="end the run there")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args, config_args = p.parse_known_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass args on purpose

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
            checkpoint_s: list[float] = []
            for callback in cli.trainer.callbacks:
                if isinstance(callback, TrainingMonitor):
                    clock_calls(callback, "generate_sample", sample_s, cli.trainer)
                elif isinstance(callback, RunCheckpoint):
                    clock_calls(callback, "on_validation_end", checkpoint_s, cli.trainer)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
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
