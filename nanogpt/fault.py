"""Stopping well: SIGTERM and Ctrl-C finish the step and checkpoint; a non-finite loss stops before it harms the weights.

    SIGTERM (cluster preemption) -> checkpoint, exit 143;  SIGINT (Ctrl-C) -> checkpoint, exit 130.
    A second Ctrl-C while that checkpoint is written aborts at once (the previous checkpoint stays intact).
"""

from __future__ import annotations

import signal
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.errors import NanoGPTError


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the process should exit with exit_code."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # what a shell reports for a process killed by the signal
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint callback, nothing saved"
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped after step {step}, {where}; "
            "resume with --ckpt_path last"
        )


class NonFiniteLossError(NanoGPTError):
    """The training loss became NaN or inf; raised before the backward pass, so the weights stay finite."""


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True when flag is set on any rank (one tiny all-reduce under DDP, none on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce_boolean_decision(flag, all=False)
    return flag


class FaultTolerance(Callback):
    """Turns SIGTERM / SIGINT into a checkpoint at the next step boundary, and stops on a non-finite loss.

    Signal handlers are installed when training starts (after Lightning's own, which they replace while
    training runs) and the previous ones are put back when it ends. The decision to stop is taken on all
    ranks together, so every rank takes part in the checkpoint.

    Args:
        check_finite_loss: stop, naming the step, when the training loss is NaN or inf (costs one host sync per step).
    """

    def __init__(self, check_finite_loss: bool = True) -> None:
        self.check_finite_loss = check_finite_loss
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._stopping: Optional[tuple[int, Optional[str]]] = None  # (signal, checkpoint) once the stop is decided

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: give up on the checkpoint, stop now
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self._stopping = None, None
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
                break

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self.check_finite_loss:
            return
        if _any_rank(trainer, not bool(torch.isfinite(loss.detach()).all())):
            raise NonFiniteLossError(
                f"the training loss became {loss.detach().float().item()} at step {trainer.global_step} "
                "(no weights were updated with it, and no checkpoint was written after it); lower "
                "--model.learning_rate or raise --model.warmup_steps, then resume the last good checkpoint "
                "with --ckpt_path last"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid gradient accumulation: the optimizer step is not taken yet
        if self._stopping is None and _any_rank(trainer, self.signum is not None):
            # the step is complete: checkpoint it here, where Lightning's loop state expects a save
            checkpoint = trainer.checkpoint_callback
            path = checkpoint.save_last_now(trainer) if hasattr(checkpoint, "save_last_now") else None
            self._stopping = (self.signum if self.signum is not None else signal.SIGTERM, path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # stop before the next step rather than at the end of the last: by now that step is logged (and validated,
        # when one was due, which re-saves last.ckpt), so the checkpoint and the curves agree
        if self._stopping is not None:
            signum, path = self._stopping
            raise TrainingInterrupted(signum, trainer.global_step, path)
