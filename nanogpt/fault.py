"""Stopping well: SIGTERM and Ctrl-C finish the step and checkpoint; a non-finite loss stops before it harms the weights.

    SIGTERM (cluster preemption) -> checkpoint, exit 143;  SIGINT (Ctrl-C) -> checkpoint, exit 130.
    A second Ctrl-C while that checkpoint is written aborts at once (the previous checkpoint stays intact).
    A NaN or inf loss or gradient -> the optimizer skips that step on the device (no host sync), and the run stops
    with an error naming it at the next logging step or checkpoint, whichever comes first.
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
    """The training loss or gradients became NaN or inf; the weights were not updated with them."""


# "no bad step", as a step number: larger than any real step, so the first bad step is a min (over steps and ranks)
_NONE = 2**62


class NonFiniteGuard:
    """Keeps NaN and inf out of the weights without a host-device sync per step.

    Each optimizer step it looks at the loss and the total gradient norm on the device: a non-finite gradient norm
    makes a fused AdamW skip the step (its `found_inf`, as GradScaler uses it: weights, moments and step count stay
    as they were), and the step's two flags are kept, unread, until someone asks. Reading them costs a sync, so
    FaultTolerance asks every log_every_n_steps and before every checkpoint. Three tiny device ops a step.
    An optimizer that is not fused cannot skip on the device: then a bad gradient norm is checked at once (a sync).
    """

    def __init__(self) -> None:
        self._steps: list[tuple[int, torch.Tensor]] = []  # (step, () bool "loss and gradients finite"), unread
        self._first_bad: Optional[torch.Tensor] = None  # () int64: the first bad step of earlier, folded-in steps
        self._loss_ok: Optional[torch.Tensor] = None  # () bool: this step's micro-batch losses were all finite
        self._found_inf: Optional[torch.Tensor] = None  # () float32 handed to the fused optimizer, updated in place

    def see_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch loss of the current optimizer step (every micro-batch, before its backward pass)."""
        ok = torch.isfinite(loss.detach())
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def see_step(self, optimizer: Any, grad_norm: torch.Tensor, step: int, check_grads: bool = True) -> None:
        """The step's total gradient norm (of the reduced gradients, so equal on every rank), before optimizer.step.

        check_grads=False where a GradScaler owns inf gradients (fp16): it skips those steps itself, by design.
        """
        ok, self._loss_ok = self._loss_ok, None
        if check_grads:
            grads_ok = torch.isfinite(grad_norm)
            if getattr(optimizer, "defaults", {}).get("fused"):
                if self._found_inf is None or self._found_inf.device != grad_norm.device:
                    self._found_inf = torch.zeros((), dtype=torch.float32, device=grad_norm.device)
                # 1.0 where the gradients are not finite; every rank sees the same norm, so all skip the same steps
                torch.logical_not(grads_ok, out=self._found_inf)
                optimizer.found_inf = self._found_inf
            elif not bool(grads_ok):  # an optimizer that cannot skip on the device: check now (a sync)
                raise NonFiniteLossError(self.message(step))
            ok = grads_ok if ok is None else ok & grads_ok
        if ok is not None:
            self._steps.append((step, ok))
            if len(self._steps) >= 1024:  # nobody reads them (no FaultTolerance): keep the memory bounded
                self._fold()

    def _fold(self) -> None:
        """Folds the unread steps into _first_bad, on the device (one small host-to-device copy of step numbers)."""
        if not self._steps:
            return
        oks = torch.stack([ok for _, ok in self._steps])  # (n,) bool
        steps = torch.tensor([step for step, _ in self._steps], device=oks.device)  # (n,) int64
        first = torch.where(oks, _NONE, steps).min()
        self._first_bad = first if self._first_bad is None else torch.minimum(self._first_bad, first)
        self._steps = []

    def bad_step(self, trainer: L.Trainer) -> Optional[int]:
        """The first step with a non-finite loss or gradient on any rank, or None.

        A sync, and a collective under DDP: every rank must call it at the same step.
        """
        self._fold()
        if self._first_bad is None:
            return None
        first = self._first_bad
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first.clone(), reduce_op="min")  # every rank saw the same steps
        step = int(first)
        return None if step == _NONE else step

    @staticmethod
    def message(step: int) -> str:
        return (
            f"the training loss or its gradients became NaN or inf at step {step}; no weights were updated with "
            "non-finite gradients and no checkpoint was written after it. Lower --model.learning_rate or raise "
            "--model.warmup_steps, then resume the last good checkpoint with --ckpt_path last"
        )


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
        check_finite_loss: stop, naming the step, when the training loss or gradients became NaN or inf (read from
            the module's NonFiniteGuard every log_every_n_steps and before every checkpoint, not every step).
    """

    def __init__(self, check_finite_loss: bool = True) -> None:
        self.check_finite_loss = check_finite_loss
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._stopping: Optional[tuple[int, Optional[str]]] = None  # (signal, checkpoint) once the stop is decided
        self._every = 0  # log_every_n_steps: how often the non-finite flag is read

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: give up on the checkpoint, stop now
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self._stopping = None, None
        # read the non-finite flags where the logs are written (a sync there anyway); with logging off, every 100
        self._every = trainer.log_every_n_steps if trainer.log_every_n_steps > 0 else 100
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

    def _check_finite(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        guard: Optional[NonFiniteGuard] = getattr(pl_module, "nonfinite", None)
        if not self.check_finite_loss or guard is None:
            return
        step = guard.bad_step(trainer)
        if step is not None:
            raise NonFiniteLossError(guard.message(step))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # before every write, on every rank (Lightning builds the checkpoint on all of them): nothing trained on
        # after a bad step is saved
        self._check_finite(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid gradient accumulation: the optimizer step is not taken yet
        if trainer.global_step % self._every == 0:
            self._check_finite(trainer, pl_module)
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
