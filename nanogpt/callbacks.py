"""Callbacks the training CLI installs by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nanogpt.checkpoint import atomic_link, non_finite_tensors, remove_stale_temp_files, step_checkpoint_name, step_checkpoints
from nanogpt.errors import NanoGPTError


# the callback hooks Lightning calls on every training step (or micro-step)
STEP_HOOKS = (
    "on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_train_batch_end",
)


def skip_empty_step_hooks(callbacks: list[Callback]) -> None:
    """Hides the per-step hooks a callback leaves empty (Callback's own no-ops) from Lightning's dispatcher.

    Lightning calls every callback's hook at each of its six per-step events, empty or not, each call wrapped in a
    profiler context and a built name (about 8 Python calls). It skips a hook that is not callable, so an empty one
    set to None on the instance costs nothing: with the default callbacks, some 20 of 30 calls a step.
    """
    for callback in callbacks:
        for name in STEP_HOOKS:
            if getattr(type(callback), name, None) is getattr(Callback, name):
                setattr(callback, name, None)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run dir: `best.ckpt` by val/loss and `last.ckpt`, plus a last save when training ends.

    Lightning's own end-of-training save is skipped once any checkpoint exists, so a run whose final
    step falls between two validations would lose its last steps; this one saves unless that step is saved.
    `last.ckpt` is also written every `every_n_steps` optimizer steps, and each write of it is kept as
    `step-<N>.ckpt` (a hard link, no second write) for the `keep_last_k` newest steps, so an older good
    checkpoint survives whatever happens to the newest. Weights holding NaN or inf are never saved.
    A run dir that was moved or copied resumes into its own best.ckpt and last.ckpt (see load_state_dict).

    Args:
        every_n_steps: also checkpoint every this many optimizer steps (None: only at validations and the end).
        keep_last_k: how many step-N.ckpt files to keep besides last.ckpt and best.ckpt (0: none).
    """

    def __init__(self, dirpath: str, every_n_steps: Optional[int] = None, keep_last_k: int = 2, **kwargs) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise NanoGPTError(f"checkpoint.every_n_steps must be a positive integer or null, got {every_n_steps}")
        if keep_last_k < 0:
            raise NanoGPTError(f"checkpoint.keep_last_k must be 0 or more, got {keep_last_k}")
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
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self._last_step_in_last: Optional[int] = None  # the global step last.ckpt holds, once this run wrote it
        self._best_shared: Optional[tuple[int, str]] = None  # (step, file) of a best.ckpt that last.ckpt can link to

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temp_files(self.dirpath)  # left by a writer that was killed mid-save

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
            and not trainer.fit_loop.epoch_loop._should_accumulate()
            and not self._validates_now(trainer)  # then the save after validation covers this step
        ):
            self.save_last_now(trainer)

    @staticmethod
    def _validates_now(trainer: L.Trainer) -> bool:
        epoch_loop = trainer.fit_loop.epoch_loop
        return bool(trainer.enable_validation) and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)

    def save_last_now(self, trainer: L.Trainer) -> Optional[str]:
        """Writes last.ckpt (and its step link) for the current step unless it already holds it; returns its path."""
        if not self.save_last:
            return None
        if self._last_step_in_last != trainer.global_step:
            judged = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # best.ckpt has not been judged at this step: a validation at this step must still do so
            self._last_global_step_saved = judged
        return self.last_model_path

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath:
            state_dict = self._moved_here(state_dict)
        super().load_state_dict(state_dict)

    def _moved_here(self, state: dict[str, Any]) -> dict[str, Any]:
        """The stored state of a run dir that was moved or copied, with its paths in this run's checkpoint dir.

        The state holds absolute paths. Given another dir, Lightning restores only best_model_path (still the old
        one) and drops the best score and last.ckpt's path, so its next saves avoid the files of the same names
        here and write best-v1.ckpt and last-v1.ckpt, and best.ckpt is replaced by any val/loss. Pointing every path
        at the file of the same name here continues this dir's own files and score, and leaves nothing that could
        write into or delete from the old dir. A file that is not here (only some files were copied, or the run
        resumes another run's checkpoint in a new dir) is dropped with its score: this dir's best is judged afresh.
        """

        def here(path: str) -> str:
            moved = os.path.join(self.dirpath, os.path.basename(path)) if path else ""
            # every rank looks: the run dir is on a file system all ranks see (multi-node runs need that anyway)
            return moved if moved and self._fs.isfile(moved) else ""

        best_k_models = {}
        for path, score in state.get("best_k_models", {}).items():
            if moved_path := here(path):
                best_k_models[moved_path] = score
        if best_k_models:  # the best of those here (with save_top_k 1, best.ckpt itself), as Lightning picks it
            pick = min if self.mode == "min" else max
            best_model_path = pick(best_k_models, key=best_k_models.get)
            best_model_score = best_k_models[best_model_path]
        else:
            best_model_path, best_model_score = here(state.get("best_model_path", "")), None
        kth = here(state.get("kth_best_model_path", ""))
        moved = {
            **state,
            "dirpath": self.dirpath,
            "best_k_models": best_k_models,
            "best_model_path": best_model_path,
            "best_model_score": best_model_score,
            "kth_best_model_path": kth if kth in best_k_models else "",
            "last_model_path": here(state.get("last_model_path", "")),
        }
        if not moved["kth_best_model_path"]:
            moved.pop("kth_value", None)  # no k-th model here: keep the initial value (inf when minimising)
        return moved

    @property
    def state_key(self) -> str:
        # Lightning formats this key for every callback hook it calls, several times a step; what it encodes
        # (monitor, mode, save triggers) is fixed at init, so build it once
        if "_state_key" not in self.__dict__:
            self._state_key = super().state_key
        return self._state_key

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.save_last and self._last_global_step_saved != step and self._last_step_in_last != step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        bad = non_finite_tensors(trainer.lightning_module.state_dict())
        if bad:
            raise NanoGPTError(
                f"the weights became non-finite at step {trainer.global_step} ({', '.join(bad[:3])}); they were not "
                f"saved to {Path(filepath).name}. Lower --model.learning_rate, then resume with --ckpt_path last"
            )
        super()._save_checkpoint(trainer, filepath)

    def _update_best_and_save(self, current: Any, trainer: L.Trainer, monitor_candidates: dict) -> None:
        # Lightning writes best.ckpt and then last.ckpt of one and the same state. With last.ckpt named in the
        # callback state before the first write, the state stored in best.ckpt is right for last.ckpt too, and
        # last.ckpt becomes a hard link to it (_save_last_checkpoint): one write of the state instead of two
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        shared = self.save_last is True and self.last_model_path in ("", last)
        if shared:
            self.last_model_path = last
        super()._update_best_and_save(current, trainer, monitor_candidates)
        self._best_shared = (trainer.global_step, self._last_checkpoint_saved) if shared else None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        shared, self._best_shared = self._best_shared, None
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if shared is not None and shared[0] == trainer.global_step and self.last_model_path == last:
            if trainer.is_global_zero:
                atomic_link(shared[1], last)  # best.ckpt's state, written at this very step
            trainer.strategy.barrier()
            self._last_checkpoint_saved = last
        else:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        if not self.save_last or self._last_global_step_saved != trainer.global_step:
            return
        self._last_step_in_last = trainer.global_step
        if trainer.is_global_zero and self.keep_last_k > 0 and self.last_model_path:
            last = Path(self.last_model_path)
            atomic_link(last, last.with_name(step_checkpoint_name(trainer.global_step)))
            for old in step_checkpoints(last.parent)[self.keep_last_k :]:
                old.unlink(missing_ok=True)
        trainer.strategy.barrier()
