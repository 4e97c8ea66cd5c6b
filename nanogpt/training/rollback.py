"""Bad steps: found on every rank alike, then rolled back to the newest good checkpoint (or the run stops).

A step is bad when its loss or gradients are NaN or inf (the module's NonFiniteGuard), when its loss is a spike
(above spike_factor x the median of the recent losses before it), or when the weights are non-finite where a
checkpoint is about to be written. Rollback reads all three at the steps where a host read happens anyway: every
log_every_n_steps steps and before every checkpoint, never once per step.

    --fault.on_bad_step rollback (default): the run goes back to the newest checkpoint saved before the bad step
    (weights, optimizer, schedule, RNG states and step, through Lightning's own resume in this process), skips the
    training data of the steps from there to the bad step (plus --fault.skip_steps), and goes on;
    --fault.on_bad_step stop: it stops with a one-line error, keeping the checkpoints.

A bad step before the first checkpoint stops the run (nothing exact to return to). Every rollback is recorded in
the checkpoints (this callback's state), and the data a step reads is a pure function of (seed, rank, step, the
recorded skips), so a run that rolled back and was resumed continues exactly as if left alone.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from nanogpt.data.blocks import DataSkips
from nanogpt.errors import NanoGPTError
from nanogpt.io import read_checkpoint
from nanogpt.private import text_pb
from nanogpt.training.fault import NonFiniteGuard, NonFiniteLossError
from nanogpt.training.loggers import tensorboard_file_writers
from nanogpt.training.module import require_gpt_module
from nanogpt.training.steps import ends_optimizer_step


class LossSpikeError(NanoGPTError):
    """The training loss jumped far above its recent level; the run stopped (--fault.on_bad_step stop)."""


@dataclass(frozen=True)
class BadStep:
    """A bad optimizer step (its index, as the guard counts: trainer.global_step while it ran) and why."""

    step: int
    kind: Literal["non-finite", "spike", "weights"]
    why: str


class RollbackRequested(Exception):
    """Raised out of Trainer.fit on every rank at the same step, to be fitted again from a good checkpoint."""

    all_ranks = True  # FaultTolerance closes its stop vote cleanly: no rank is left waiting in it

    def __init__(self, bad: BadStep) -> None:
        super().__init__(f"step {bad.step}: {bad.why}")
        self.bad = bad


class SpikeDetector:
    """Per-rank windows of recent finite training losses; a loss is a spike above factor x its window's median.

    The median of the losses before the judged step ignores the step itself and any lone outlier among them. Fed
    with every rank's losses (gathered), so every rank holds the same windows and reaches the same verdict.
    """

    def __init__(self, factor: Optional[float], window: int, warmup: int) -> None:
        self.factor, self.window, self.warmup = factor, window, warmup
        self.windows: list[list[float]] = []  # per global rank, oldest first

    def judge(self, steps: list[int], losses: list[list[float]]) -> Optional[BadStep]:
        """The first spike among steps (losses: (world, len(steps)), by rank), else None; good losses join the windows."""
        while len(self.windows) < len(losses):
            self.windows.append([])
        for j, step in enumerate(steps):
            for rank, series in enumerate(losses):
                loss, window = series[j], self.windows[rank]
                if not math.isfinite(loss):
                    continue  # the NonFiniteGuard's finding, not a spike
                if self.factor and step >= self.warmup and len(window) >= max(1, self.window // 2):
                    mean = statistics.median(window)
                    if loss > self.factor * mean:
                        where = f" on rank {rank}" if len(losses) > 1 else ""
                        return BadStep(step, "spike", f"its loss {loss:.4g}{where} is {loss / mean:.1f}x the running "
                                                      f"mean {mean:.4g}, above --fault.spike_factor {self.factor:g}")
                window.append(loss)
                del window[: -self.window]
        return None


class Rollback(Callback):
    """Finds bad steps on every rank alike and rolls back to the newest good checkpoint, or stops the run.

    Args:
        on_bad_step: "rollback" (go back to the newest good checkpoint, skip the data of the bad stretch, go on) or
            "stop" (stop with a one-line error, exit code 2).
        spike_factor: a step whose training loss exceeds this many times the running mean (the median of the
            previous spike_window steps' losses) is bad; null: no spike detection (non-finite steps still are).
        spike_window: how many recent steps' losses make the running mean.
        spike_warmup: no spike verdicts before this step (the early loss falls fast and is judged by nothing yet).
        skip_steps: after a rollback, skip this many more steps of training data beyond the bad step.
        max_rollbacks: stop (with the bad step's error) at a bad step after this many rollbacks within
            rollback_window steps.
        rollback_window: the stretch of steps max_rollbacks counts over.
    """

    def __init__(
        self,
        on_bad_step: Literal["rollback", "stop"] = "rollback",
        spike_factor: Optional[float] = 2.0,
        spike_window: int = 50,
        spike_warmup: int = 100,
        skip_steps: int = 0,
        max_rollbacks: int = 3,
        rollback_window: int = 1000,
    ) -> None:
        if spike_factor is not None and not spike_factor > 1.0:
            raise NanoGPTError(f"fault.spike_factor must be above 1 (or null: no spike detection), got {spike_factor}")
        for name, value, least in (("spike_window", spike_window, 1), ("spike_warmup", spike_warmup, 0),
                                   ("skip_steps", skip_steps, 0), ("max_rollbacks", max_rollbacks, 0),
                                   ("rollback_window", rollback_window, 1)):
            if value < least:
                raise NanoGPTError(f"fault.{name} must be {least} or more, got {value}")
        self.on_bad_step = on_bad_step
        self.skip_steps, self.max_rollbacks, self.rollback_window = skip_steps, max_rollbacks, rollback_window
        self.detector = SpikeDetector(spike_factor, spike_window, spike_warmup)
        self.history: list[dict[str, Any]] = []  # one record per rollback this run's timeline went through
        self._pending: Optional[dict[str, Any]] = None  # the rollback whose checkpoint is being restored
        self._announce: Optional[dict[str, Any]] = None  # ... and, restored, is logged when training starts
        self._step_loss: Optional[torch.Tensor] = None  # () the optimizer step's micro-batch losses so far
        self._losses: list[torch.Tensor] = []  # each unread step's loss, on the device
        self._steps: list[int] = []  # ... and its index

    # --- the record in checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # equal on every rank: the windows hold every rank's losses (gathered), the history every rank's verdicts
        return {"history": [dict(r) for r in self.history], "spike_windows": [list(w) for w in self.detector.windows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # restored in on_load_checkpoint, which sees the trainer (the data module takes the skips)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        self.detector.windows = [list(w) for w in state.get("spike_windows", [])]
        if self._pending is not None:
            # rolled back in this process: the history lived on after this checkpoint was written, and grows by one
            self.history, self._announce, self._pending = self.history + [self._pending], self._pending, None
        else:
            self.history = [dict(r) for r in state.get("history", [])]
        self._apply_skips(trainer)

    def _apply_skips(self, trainer: L.Trainer) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "skips"):
            # before train_dataloader (Lightning restores checkpoints first): steps from `returned_to` on read
            # `skipped` steps further on
            datamodule.skips = DataSkips(tuple((r["returned_to"], r["skipped"]) for r in self.history))

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_gpt_module(pl_module, self, "the NonFiniteGuard (nonfinite)")
        if stage == "fit":
            self._apply_skips(trainer)  # a new run; a resumed one is set again from its checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_loss, self._losses, self._steps = None, [], []
        step = trainer.global_step
        for logger in trainer.loggers:  # the running count; loggers write on rank 0 only
            logger.log_metrics({"train/rollbacks": float(len(self.history))}, step=step)
        announce, self._announce = self._announce, None
        if announce is not None and trainer.is_global_zero:
            # text_pb keeps the tag as given (SummaryWriter.add_text would append "/text_summary")
            for writer in tensorboard_file_writers(trainer):
                writer.add_summary(text_pb("train/rollback", describe(announce)), step)
        elif self.history and trainer.is_global_zero:  # a resumed run: its earlier rollbacks, once
            print(f"rollbacks so far: {len(self.history)} ({'; '.join(describe(r) for r in self.history)})", flush=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.detector.factor:
            # the micro-batch's loss (divided by the accumulation: the step's loss is their sum), a detached device
            # tensor: adding it up is a device op, no sync
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                first = batch_idx % trainer.accumulate_grad_batches == 0
                self._step_loss = loss if first or self._step_loss is None else self._step_loss + loss
        if not ends_optimizer_step(trainer, batch_idx):
            return
        if self._step_loss is not None:
            self._losses.append(self._step_loss)
            self._steps.append(trainer.global_step - 1)  # the step just taken
            self._step_loss = None
        saving = self._save_due(trainer)
        every = trainer.log_every_n_steps if trainer.log_every_n_steps > 0 else 100
        if saving or trainer.global_step % every == 0 or len(self._losses) >= 1024:
            self._check(trainer, pl_module, saving)

    def _save_due(self, trainer: L.Trainer) -> bool:
        """Whether a checkpoint may be written after this step (validation, every N steps, the end): every step it
        holds must be judged before then. Equal on every rank."""
        step = trainer.global_step
        if 0 < trainer.max_steps <= step:
            return True
        val_every = trainer.val_check_batch  # in micro-batches; inf (or None) without step-based validation
        if isinstance(val_every, int) and val_every > 0 and step * trainer.accumulate_grad_batches % val_every == 0:
            return True
        return any(
            (n := getattr(c, "every_n_steps", None)) and step % n == 0 for c in trainer.checkpoint_callbacks
        )

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, saving: bool) -> None:
        """Collectives every rank makes at the same steps, and a host read: the first bad step, acted on."""
        found: list[BadStep] = []
        guard: Optional[NonFiniteGuard] = pl_module.nonfinite  # a GPTModule (setup checked): None when not guarding
        if guard is not None and (step := guard.bad_step(trainer)) is not None:
            found.append(BadStep(step, "non-finite", "its loss or gradients became NaN or inf"))
        if self._losses:
            local = torch.stack(self._losses).float()  # (n,)
            steps, self._losses, self._steps = self._steps, [], []
            gathered = trainer.strategy.all_gather(local) if trainer.world_size > 1 else local
            spike = self.detector.judge(steps, gathered.reshape(trainer.world_size, -1).tolist())
            if spike is not None:
                found.append(spike)
        if saving and not found:
            # the weights a checkpoint would hold: a step's update may have made them non-finite after its loss
            with torch.no_grad():
                finite = torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all()
            if trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):  # shards under FSDP
                found.append(BadStep(trainer.global_step - 1, "weights", "it left the weights NaN or inf"))
        if found:
            bad = min(found, key=lambda b: b.step)
            if self.on_bad_step == "rollback":
                raise RollbackRequested(bad)
            raise stop_error(bad)

    # --- rolling back (between fits) ------------------------------------------------------------------------------
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, bad: BadStep) -> str:
        """The checkpoint to fit again from after bad, with the rollback recorded; or the stop error, raised."""
        recent = [r for r in self.history if r["bad_step"] > bad.step - self.rollback_window]
        if len(recent) >= self.max_rollbacks:
            raise stop_error(bad, f"; {len(recent)} rollbacks within {self.rollback_window} steps already "
                                  f"(--fault.max_rollbacks {self.max_rollbacks}), so the run stops")
        target = self._newest_good(trainer, bad.step)
        if target is None:
            raise stop_error(bad, "; no checkpoint was written before it, so there is nothing to roll back to")
        path, step = target
        record = {
            "bad_step": bad.step, "kind": bad.kind, "why": bad.why, "returned_to": step, "checkpoint": Path(path).name,
            "skipped": bad.step - step + 1 + self.skip_steps,
        }
        self._pending = record
        if trainer.is_global_zero:
            print(f"rollback: {describe(record)}", flush=True)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # the events of the abandoned steps are dropped from the curves, as on a resume: the writer
                    # (closed as the fit ended) is opened again with this purge step at its next event
                    logger.experiment.purge_step = step
        guard = pl_module.nonfinite
        if isinstance(guard, NonFiniteGuard):  # its unread flags belong to the abandoned steps
            pl_module.nonfinite = NonFiniteGuard(guard.skip_on_device)
        return path

    def _newest_good(self, trainer: L.Trainer, bad_step: int) -> Optional[tuple[str, int]]:
        """The newest readable checkpoint of this run at or before bad_step (every step it holds came before the bad
        one, and was judged good before it was written), as rank 0 finds it: every rank returns to the same one."""
        found: Optional[tuple[str, int]] = None
        if trainer.is_global_zero:
            candidates = [Path(trainer.ckpt_path)] if trainer.ckpt_path else []  # where this fit started
            for callback in trainer.checkpoint_callbacks:
                directory = getattr(callback, "dirpath", None)
                if directory and Path(directory).is_dir():
                    # only the files that exist: a temp file of a save in flight is no *.ckpt
                    candidates += sorted(Path(directory).glob("*.ckpt"), key=lambda p: p.name != "last.ckpt")
            for path in candidates:
                try:
                    step = int(read_checkpoint(path, mmap=True)["global_step"])
                except (NanoGPTError, OSError):
                    continue  # unreadable: the next one
                if step <= bad_step and (found is None or step > found[1]):
                    found = (str(path), step)
        return trainer.strategy.broadcast(found, src=0)


def describe(record: dict[str, Any]) -> str:
    """One line: the bad step, why, the checkpoint returned to and the data skipped."""
    start, skipped = record["returned_to"], record["skipped"]
    return (
        f"step {record['bad_step']} was bad ({record['why']}); returned to step {start} ({record['checkpoint']}) "
        f"and skipped {skipped} steps of training data (the batches of steps {start}-{start + skipped - 1})"
    )


def stop_error(bad: BadStep, why_stop: str = "") -> NanoGPTError:
    """The one-line error a bad step stops the run with (exit code 2)."""
    if bad.kind == "non-finite":
        return NonFiniteLossError(NonFiniteGuard.message(bad.step) + why_stop, bad.step)
    if bad.kind == "weights":
        return NanoGPTError(
            f"the weights became non-finite at step {bad.step + 1}; they were not saved. Lower "
            f"--model.learning_rate, then resume with --ckpt_path last{why_stop}"
        )
    return LossSpikeError(
        f"the training loss spiked at step {bad.step}: {bad.why}; no checkpoint was written after it. Lower "
        f"--model.learning_rate or raise --fault.spike_factor, then resume with --ckpt_path last{why_stop}"
    )


def fit_with_rollbacks(
    trainer: L.Trainer, model: L.LightningModule, datamodule: Any = None, ckpt_path: Optional[str] = None
) -> None:
    """trainer.fit, fitted again from the newest good checkpoint after each rollback its Rollback callback asks for."""
    rollback = next((c for c in trainer.callbacks if isinstance(c, Rollback)), None)
    again = False
    while True:
        try:
            with warnings.catch_warnings():
                if again:  # the checkpoint dir is this run's own, as on any resume
                    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            return
        except RollbackRequested as e:
            assert rollback is not None, "RollbackRequested is raised by a Rollback callback"
            bad = e.bad
        except NonFiniteLossError as e:
            # the guard's own stop (on a CPU it reads a bad gradient norm at once): every rank at the same step
            if rollback is None or rollback.on_bad_step != "rollback" or e.step is None:
                raise
            bad = BadStep(e.step, "non-finite", "its loss or gradients became NaN or inf")
        if any(getattr(c, "signum", None) is not None for c in trainer.callbacks):
            # SIGTERM or Ctrl-C came (FaultTolerance): the run was asked to stop, so it stops, on the bad step's error
            raise stop_error(bad)
        ckpt_path, again = rollback.prepare(trainer, model, bad), True
