"""Faults injected into real training runs through a config's trainer.callbacks (tests of nanogpt/training/rollback.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback


class Fault(Callback):
    """Spoils one step of training, `times` times in this process (so a rollback past it trains on cleanly).

    what: "nan_loss" (a weight NaN before the step's forward), "nan_grad" (a gradient NaN after its backward),
    "nan_weights" (a weight NaN after its update: the loss stays finite, a save finds it), "scale" (every weight
    times `factor` before the step's forward: a finite loss spike). rank: only on that global rank.
    """

    def __init__(self, step: int, what: str = "scale", factor: float = 30.0, rank: Optional[int] = None,
                 times: int = 1) -> None:
        self.step, self.what, self.factor, self.rank, self.times = step, what, factor, rank, times

    def _due(self, trainer, step: int) -> bool:
        if trainer.global_step != step or self.times <= 0 or self.rank not in (None, trainer.global_rank):
            return False
        self.times -= 1
        return True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what in ("nan_loss", "scale") and self._due(trainer, self.step):
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(self.factor) if self.what == "scale" else p.fill_(float("nan"))
                    if self.what == "nan_loss":
                        break

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "nan_grad" and self._due(trainer, self.step):
            next(pl_module.parameters()).grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.what == "nan_weights" and self._due(trainer, self.step + 1):  # after the step's update
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class RecordSkips(Callback):
    """Writes each rank's data skips (the windows its batches pass over) to RUN/skips-rank<R>.json at the end."""

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"skips-rank{trainer.global_rank}.json"
        path.write_text(json.dumps([list(w) for w in trainer.datamodule.skips.windows]), encoding="utf-8")
