"""Which training batches end an optimizer step, and which optimizer steps are logged.

Called from on_train_batch_end hooks (of the module and of callbacks), where the optimizer step of a batch that
ends one has been taken: trainer.global_step counts it already.
"""

from __future__ import annotations

import lightning as L


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this batch is the last micro-batch of an optimizer step (the training stream is endless, so a step
    is always accumulate_grad_batches micro-batches, and every epoch starts at a step boundary)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def is_logging_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this batch ends an optimizer step whose training scalars are logged: Lightning's own rule
    (every log_every_n_steps steps, and the step where training is asked to stop), so the values logged here with
    self.log are written at this very step. Logging on other steps only costs time (and, on a GPU, a sync)."""
    every = trainer.log_every_n_steps
    return (
        every > 0
        and ends_optimizer_step(trainer, batch_idx)
        and (trainer.global_step % every == 0 or trainer.should_stop)
    )


def logged_step(trainer: L.Trainer) -> int:
    """The step training and validation scalars are logged at after an optimizer step: the index of that step
    (train/loss of the first step is at step 0), for summaries written outside self.log (text, histograms)."""
    return max(trainer.global_step - 1, 0)
