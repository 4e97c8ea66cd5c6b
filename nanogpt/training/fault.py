"""Stopping well: SIGTERM and Ctrl-C finish the step and checkpoint; a non-finite loss stops before it harms the weights.

    SIGTERM (cluster preemption) -> checkpoint, exit 143;  SIGINT (Ctrl-C) -> checkpoint, exit 130.
    SIGUSR1 (SLURM's warning before a time limit) -> checkpoint, exit 138, and the job requeued
    (nanogpt/training/cluster.py).
    A second Ctrl-C while that checkpoint is written aborts at once (the previous checkpoint stays intact).
    A NaN or inf loss or gradient -> the optimizer skips that step on the device (no host sync), and the run stops
    with an error naming it at the next logging step or checkpoint, whichever comes first. On a CPU, where reading
    costs no sync, a non-finite gradient stops the run at once, before the optimizer step.
"""

from __future__ import annotations

import math
import signal
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from nanogpt.training.checkpointing import save_last_checkpoint
from nanogpt.training.cluster import stop_signals
from nanogpt.io import non_finite_tensors
from nanogpt.training.strategies import all_reduce
from nanogpt.errors import NanoGPTError, StoppedWithAnotherRank
from nanogpt.private import silence_sigterm_broadcast
from nanogpt.training.steps import ends_optimizer_step


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
    """The training loss or gradients became NaN or inf; the weights were not updated with them.

    step: the first bad step (every rank raises it at the same step, so a rollback can start from it).
    """

    def __init__(self, message: str, step: Optional[int] = None) -> None:
        super().__init__(message)
        self.step = step


# "no bad step", as a step number: larger than any real step, so the first bad step is a min (over steps and ranks)
_NONE = 2**62


class NonFiniteGuard:
    """Keeps NaN and inf out of the weights without a host-device sync per step.

    Each optimizer step it looks at the loss and the total gradient norm on the device: a non-finite gradient norm
    makes a fused AdamW skip the step (its `found_inf`, as GradScaler uses it: weights, moments and step count stay
    as they were), and the step's two flags are kept, unread, until someone asks. Reading them costs a sync, so
    FaultTolerance asks every log_every_n_steps and before every checkpoint. Three tiny device ops a step.
    An optimizer that is not fused cannot skip on the device: then a bad gradient norm is checked at once (a sync).
    A CPU reads the loss and the norm as Python floats instead: there a read waits for nothing, while the device
    ops cost more (about 0.1 to 0.2 ms a step for the isfinite ops and folds, and about 0.1 ms more for the fused
    AdamW's skip, which undoes the step count of every parameter tensor one by one; benchmarks/RESULTS.md). A bad
    gradient norm then stops the run at once; a bad loss is kept, like the device's flags, for the next check.

    Args:
        skip_on_device: let a fused optimizer skip a bad step on the device instead of checking the flag at once;
            None: wherever the gradients are not on the CPU. On a CPU, True keeps the device's way (tests use it
            as the twin of a GPU's guard); None and False read floats there.
    """

    def __init__(self, skip_on_device: Optional[bool] = None) -> None:
        self.skip_on_device = skip_on_device
        self._steps: list[tuple[int, torch.Tensor]] = []  # (step, () bool "loss and gradients finite"), unread
        self._first_bad: Optional[torch.Tensor] = None  # () int64: the first bad step of earlier, folded-in steps
        self._loss_ok: Optional[torch.Tensor] = None  # () bool: this step's micro-batch losses were all finite
        self._found_inf: Optional[torch.Tensor] = None  # () float32 handed to the fused optimizer, updated in place
        # the CPU's way: the same record in plain Python, no tensor ops
        self._host_loss_ok = True  # this step's micro-batch losses so far were all finite
        # the first step with a non-finite loss; _NONE once a step was seen this way, None before (then bad_step has
        # nothing of it to all-reduce)
        self._host_first_bad: Optional[int] = None

    def _on_host(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and not self.skip_on_device

    def see_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch loss of the current optimizer step (every micro-batch, before its backward pass)."""
        if self._on_host(loss):
            self._host_loss_ok = self._host_loss_ok and math.isfinite(loss.item())
            return
        ok = torch.isfinite(loss.detach())
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def see_step(self, optimizer: Any, grad_norm: torch.Tensor, step: int, check_grads: bool = True) -> None:
        """The step's total gradient norm (of the reduced gradients, so equal on every rank), before optimizer.step.

        check_grads=False where a GradScaler owns inf gradients (fp16): it skips those steps itself, by design.
        """
        if self._on_host(grad_norm):
            loss_ok, self._host_loss_ok = self._host_loss_ok, True
            if check_grads and not math.isfinite(grad_norm.item()):  # equal on every rank: all stop here together
                raise NonFiniteLossError(self.message(step), step)
            first = _NONE if self._host_first_bad is None else self._host_first_bad
            # a bad loss may be one rank's: the ranks agree on it at the next check
            self._host_first_bad = first if loss_ok else min(first, step)
            return
        ok, self._loss_ok = self._loss_ok, None
        if check_grads:
            grads_ok = torch.isfinite(grad_norm)
            # off the CPU (or skip_on_device=True on it): skip on the device unless told not to
            if self.skip_on_device is not False and getattr(optimizer, "defaults", {}).get("fused"):
                if self._found_inf is None or self._found_inf.device != grad_norm.device:
                    self._found_inf = torch.zeros((), dtype=torch.float32, device=grad_norm.device)
                # 1.0 where the gradients are not finite; every rank sees the same norm, so all skip the same steps
                torch.logical_not(grads_ok, out=self._found_inf)
                optimizer.found_inf = self._found_inf
            elif not bool(grads_ok):  # skip_on_device=False, or an optimizer that cannot skip: check now (a sync)
                raise NonFiniteLossError(self.message(step), step)
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
        first = self._first_bad
        if self._host_first_bad is not None:
            host = torch.tensor(self._host_first_bad)
            first = host if first is None else torch.minimum(first, host.to(first.device))
        if first is None:
            return None
        if trainer.world_size > 1:
            first = all_reduce(first, "min", trainer.strategy)  # every rank saw the same steps
        step = int(first)
        return None if step == _NONE else step

    @staticmethod
    def message(step: int) -> str:
        return (
            f"the training loss or its gradients became NaN or inf at step {step}; no weights were updated with "
            "non-finite gradients and no checkpoint was written after it. Lower --model.learning_rate or raise "
            "--model.warmup_steps, then resume the last good checkpoint with --ckpt_path last"
        )


class StopVote:
    """Whether any rank has been signalled, agreed by every rank at the same step without a host-device sync.

    Under DDP on GPUs the default process group is NCCL: a vote there all-reduces a device tensor, and reading the
    answer (.item()) waits for every kernel queued so far, so once a step the CPU idles until the GPU catches up
    instead of queueing the next step's kernels.
    This vote runs on a gloo group of its own, on a CPU tensor, in the background: each optimizer step reads the
    answer of the all-reduce started one step earlier (long finished) and starts the next. Every rank reads the
    same answer at the same step, one step after the signal.
    Falls back to the strategy's blocking reduce_boolean_decision when no gloo group can be made.
    """

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer
        self.group: Any = None
        self._flag = torch.zeros(1, dtype=torch.int32)  # (1,) on the CPU: 1 once this rank has seen a signal
        self._work: Any = None  # the all-reduce in flight
        if dist.is_available() and dist.is_initialized():
            try:  # a collective: every rank makes the group at on_train_start
                self.group = dist.new_group(backend="gloo")
            except (RuntimeError, ValueError):  # a torch built without gloo
                self.group = None

    def any_rank(self, flag: bool) -> bool:
        """True when some rank passed flag=True to an earlier call (every rank gets the same answer)."""
        if self.group is None:
            return self.trainer.strategy.reduce_boolean_decision(flag, all=False)  # blocking, and a sync on GPUs
        if self._work is not None:
            self._work.wait()  # started a step ago: done by now
            self._work = None
            if self._flag.item():
                return True  # decided: no further vote is started, so none is left in flight
        self._flag.fill_(int(flag))
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return False

    def close(self, wait: bool = True) -> None:
        """Ends the vote. wait=False after an error, when another rank may never finish the vote in flight."""
        if self.group is None:
            return
        if wait and self._work is not None:
            self._work.wait()  # every rank started the same votes, so this one completes
            self._work = None
        if self._work is None:  # with one in flight (after an error) the group is left to the process's exit
            try:
                dist.destroy_process_group(self.group)
            except (RuntimeError, ValueError):  # already gone with the default group
                pass
        self.group, self._work = None, None


class FaultTolerance(Callback):
    """Turns SIGTERM / SIGINT / SIGUSR1 into a checkpoint at the next step boundary, and stops on a non-finite loss.

    Signal handlers are installed when training starts (after Lightning's own, which they replace while
    training runs) and the previous ones are put back when it ends. The decision to stop is taken on all
    ranks together (a StopVote, with no host-device sync), so every rank takes part in the checkpoint.

    Args:
        check_finite_loss: stop, naming the step, when the training loss or gradients became NaN or inf (read from
            the module's NonFiniteGuard every log_every_n_steps and before every checkpoint, not every step).
        check_at_log_steps: read it every log_every_n_steps too; False where another callback reads it there
            (nanogpt.training.rollback.Rollback, which rolls back instead of stopping).
    """

    def __init__(self, check_finite_loss: bool = True, check_at_log_steps: bool = True) -> None:
        self.check_finite_loss = check_finite_loss
        self.check_at_log_steps = check_at_log_steps
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._stopping: Optional[tuple[int, Optional[str]]] = None  # (signal, checkpoint) once the stop is decided
        self._every = 0  # log_every_n_steps: how often the non-finite flag is read
        self._vote: Optional[StopVote] = None  # under DDP: the ranks' agreement to stop
        self._unsilence: Optional[Callable[[], None]] = None  # switches Lightning's SIGTERM broadcast back on

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: give up on the checkpoint, stop now
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self._stopping = None, None
        # read the non-finite flags where the logs are written (a sync there anyway); with logging off, every 100
        self._every = trainer.log_every_n_steps if trainer.log_every_n_steps > 0 else 100
        installed = True
        for signum in stop_signals():
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
                installed = False
                break
        if trainer.world_size > 1:
            self._vote = StopVote(trainer)
            if installed:
                self._silence_lightning_broadcast(trainer)

    def _silence_lightning_broadcast(self, trainer: L.Trainer) -> None:
        # Lightning broadcasts its SIGTERM flag from rank 0 before every micro-step, a host-device sync per step on
        # GPUs; our handlers replace Lightning's while training runs, so the broadcast carries nothing and is
        # switched off until training ends. A SIGTERM Lightning caught before training started is carried over.
        if getattr(trainer, "received_sigterm", False) and self.signum is None:
            self.signum = signal.SIGTERM
        self._unsilence = silence_sigterm_broadcast(trainer)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._unsilence is not None:
            self._unsilence()
            self._unsilence = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._vote is not None:
            self._vote.close()
            self._vote = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if self._vote is not None:
            # another rank may have failed before finishing the vote in flight, unless every rank stopped at the same
            # step (a rollback: training goes on, so the vote's group is closed properly)
            self._vote.close(wait=getattr(exception, "all_ranks", False))
            self._vote = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.check_finite_loss:
            # imported here: module.py imports this file for NonFiniteGuard
            from nanogpt.training.module import require_gpt_module

            require_gpt_module(pl_module, self, "the NonFiniteGuard (nonfinite)")

    def _check_finite(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.check_finite_loss:
            return
        guard: NonFiniteGuard = pl_module.nonfinite  # a GPTModule's (checked in setup)
        step = guard.bad_step(trainer)
        if step is not None:
            raise NonFiniteLossError(guard.message(step), step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # before every write, on every rank (Lightning builds the checkpoint on all of them): nothing trained on
        # after a bad step is saved, and never weights holding NaN or inf
        self._check_finite(trainer, pl_module)
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        # every rank decides together: under FSDP a rank holds a shard, or (full state dict) nothing off rank 0,
        # and a rank that raised alone would leave the others waiting in the save's collectives
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            error, where = (NanoGPTError, ", ".join(bad[:3])) if bad else (StoppedWithAnotherRank, "on another rank")
            raise error(
                f"the weights became non-finite at step {trainer.global_step} ({where}); they were not saved. Lower "
                "--model.learning_rate, then resume with --ckpt_path last"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return  # mid gradient accumulation: the optimizer step is not taken yet
        if self.check_at_log_steps and trainer.global_step % self._every == 0:
            self._check_finite(trainer, pl_module)
        signalled = self.signum is not None
        if self._stopping is None and (self._vote.any_rank(signalled) if self._vote is not None else signalled):
            # the step is complete: checkpoint it here, where Lightning's loop state expects a save
            path = save_last_checkpoint(trainer)  # every rank takes part (a collective under DDP)
            self._stopping = (self.signum if self.signum is not None else signal.SIGTERM, path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # stop before the next step rather than at the end of the last: by now that step is logged (and validated,
        # when one was due, which re-saves last.ckpt), so the checkpoint and the curves agree
        if self._stopping is not None:
            signum, path = self._stopping
            raise TrainingInterrupted(signum, trainer.global_step, path)
