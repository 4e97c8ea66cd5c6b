"""What a run prints while it trains: a progress bar over optimizer steps, or one plain line per log interval."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from nanogpt.training.steps import is_logging_step


def format_count(value: float) -> str:
    """A compact count for progress output: 812, 12.3k, 4.56M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


# what the progress displays show of trainer.callback_metrics, in order: tag, short name, format
SHOWN = (
    ("train/loss", "loss", lambda v: f"{v:.4f}"),
    ("val/loss", "val_loss", lambda v: f"{v:.4f}"),
    ("train/tokens_per_sec", "tok/s", format_count),
    ("train/mfu", "mfu", lambda v: f"{100 * v:.1f}%"),
    ("train/lr", "lr", lambda v: f"{v:.2e}"),
)


def shown_metrics(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(short name, formatted value) of each SHOWN metric present, in SHOWN's order."""
    return [(name, fmt(float(metrics[tag]))) for tag, name, fmt in SHOWN if tag in metrics]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_label(trainer: L.Trainer, step: int) -> str:
    return f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"


class StepProgressBar(TQDMProgressBar):
    """A tqdm bar over optimizer steps (of max_steps, so it shows the time left) with loss, val loss and tokens/s.

    It redraws every refresh_rate optimizer steps (the CLI sets log_every_n_steps, when the loss changes), with the
    values in trainer.callback_metrics: training scalars are not logged with prog_bar=True, which would make
    Lightning read them back from the device after every batch.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        # a resumed run starts at its step; tqdm's rate and time left count only the steps of this session
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or self.refresh_rate <= 0 or bar.n == step:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {name: text for name, text in shown_metrics(trainer.callback_metrics) if name != "lr"}


class LogLines(Callback):
    """One plain line per log interval and one per validation instead of a progress bar (--quiet): for CI and files.

        step 100/300 | loss 2.4501 | val_loss 2.4712 | 12.3k tok/s | lr 2.81e-03 | elapsed 0:00:41 | left 0:01:22
    """

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream
        self._pending: Optional[int] = None  # a log step whose metrics Lightning has not handed over yet
        self._start = 0.0
        self._start_step = 0

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_logging_step(trainer, batch_idx):
            # the step's logged values reach trainer.callback_metrics only after this hook: print at the next one
            self._pending = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        parts = [step_label(trainer, step)]
        for name, text in shown_metrics(trainer.callback_metrics):
            parts.append(f"{text} {name}" if name == "tok/s" else f"{name} {text}")  # "12.3k tok/s": a rate
        elapsed = time.perf_counter() - self._start
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = step - self._start_step
        if trainer.max_steps > 0 and done > 0:
            parts.append(f"left {format_duration(elapsed / done * max(trainer.max_steps - step, 0))}")
        self._print(trainer, " | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        parts = [step_label(trainer, trainer.global_step)]
        for tag in ("val/loss", "val/ppl", "val/bpc"):
            if tag in m:
                parts.append(f"{tag} {float(m[tag]):.4f}")
        self._print(trainer, " | ".join(parts))
