"""Callbacks the training CLI installs by default."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run dir: `best.ckpt` by val/loss and `last.ckpt`, plus a last save when training ends.

    Lightning's own end-of-training save is skipped once any checkpoint exists, so a run whose final
    step falls between two validations would lose its last steps; this one saves unless that step is saved.
    """

    def __init__(self, dirpath: str, **kwargs) -> None:
        kwargs = {
            "filename": "best",
            "monitor": "val/loss",
            "mode": "min",
            "save_top_k": 1,
            "save_last": True,
            "auto_insert_metric_name": False,
            **kwargs,
        }
        super().__init__(dirpath=dirpath, **kwargs)

    @property
    def state_key(self) -> str:
        # Lightning formats this key for every callback hook it calls, several times a step; what it encodes
        # (monitor, mode, save triggers) is fixed at init, so build it once
        if "_state_key" not in self.__dict__:
            self._state_key = super().state_key
        return self._state_key

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
