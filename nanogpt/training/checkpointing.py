"""The checkpoints a run writes: best.ckpt by val/loss, the newest step-N.ckpt files, and last.ckpt.

best.ckpt and the step files are Lightning's ModelCheckpoint (top 1 by val/loss; top K by step, Lightning's way to
keep the newest K). last.ckpt is LastCheckpoint's: ModelCheckpoint (2.6) writes its last.ckpt only beside a
top-k save, while a run wants it at every validation, every N steps and when training ends between validations.
Every write goes through the trainer's CheckpointIO (AtomicCheckpointIO: a temp file renamed over the target),
and weights holding NaN or inf are refused before any write (FaultTolerance.on_save_checkpoint).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from nanogpt.io import atomic_save, read_checkpoint, remove_stale_temp_files, storage_error, storage_failure, tensor_bytes
from nanogpt.io import STEP_FILENAME
from nanogpt.errors import NanoGPTError
from nanogpt.training.steps import ends_optimizer_step


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files stay the run dir's own when the run dir is moved or copied (load_state_dict).

    Files are overwritten in place (no best-v1.ckpt beside a best.ckpt of the same run).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"auto_insert_metric_name": False, "enable_version_counter": False, **kwargs})

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
            return moved if moved and os.path.isfile(moved) else ""

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


class LastCheckpoint(Checkpoint):
    """Writes RUN/checkpoints/last.ckpt, the checkpoint `--ckpt_path last` resumes: after every validation, every
    every_n_steps optimizer steps, and when training ends at a step not saved yet.

    A Checkpoint, so Lightning runs it after the callbacks that judge the validation (best.ckpt's score is in it).
    It also removes the temp files a writer killed mid-save left in the checkpoint dir.
    """

    def __init__(self, dirpath: str, every_n_steps: Optional[int] = None) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self._saved_step: Optional[int] = None  # the global step last.ckpt was last written at by this run

    @property
    def filepath(self) -> str:
        return str(Path(self.dirpath) / "last.ckpt")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            remove_stale_temp_files(self.dirpath)

    def save(self, trainer: L.Trainer) -> None:
        """Writes last.ckpt now (on every rank: a collective under DDP); this step then counts as saved."""
        trainer.save_checkpoint(self.filepath, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run's step is in the file it resumed from

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return  # mid gradient accumulation: the step is not taken yet
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self._saved_step != step:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)  # also when saved before this validation: now with its results

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self.save(trainer)


def run_checkpoints(dirpath: str, every_n_steps: Optional[int] = None, keep_last_k: int = 2) -> list[Checkpoint]:
    """The checkpoint callbacks of a run: best.ckpt (the lowest val/loss); the keep_last_k newest step-N.ckpt,
    written every every_n_steps steps or, without every_n_steps, at every validation; and last.ckpt.

    Args:
        every_n_steps: also checkpoint every this many optimizer steps (None: only at validations and the end).
        keep_last_k: how many step-N.ckpt files to keep besides last.ckpt and best.ckpt (0: none).
    """
    if every_n_steps is not None and every_n_steps < 1:
        raise NanoGPTError(f"checkpoint.every_n_steps must be a positive integer or null, got {every_n_steps}")
    if keep_last_k < 0:
        raise NanoGPTError(f"checkpoint.keep_last_k must be 0 or more, got {keep_last_k}")
    callbacks: list[Checkpoint] = [
        RunCheckpoint(dirpath=dirpath, filename="best", monitor="val/loss", mode="min", save_top_k=1)
    ]
    if keep_last_k > 0:
        # "step" ranks checkpoints by their global step: the top K are the newest K
        callbacks.append(
            RunCheckpoint(
                dirpath=dirpath,
                filename=STEP_FILENAME,
                monitor="step",
                mode="max",
                save_top_k=keep_last_k,
                every_n_train_steps=every_n_steps,  # None: at every validation instead
            )
        )
    return callbacks + [LastCheckpoint(dirpath, every_n_steps)]  # last: after the others have judged the step


def save_last_checkpoint(trainer: L.Trainer) -> Optional[str]:
    """Writes the checkpoint `--ckpt_path last` resumes, where the trainer's checkpoint callbacks keep it, now (on
    every rank: a collective under DDP); returns its path, or None when no callback keeps one.

    Through LastCheckpoint.save when there is one, so that the callback does not write the same step again.
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint):
            callback.save(trainer)
            return callback.filepath
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            path = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(path, weights_only=False)
            return path
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing atomically in the target's own directory and reading safely.

    A write that fails for lack of space, a file size limit, a read-only or vanished run dir is a StorageError
    naming the file, its size and the newest intact checkpoint; its temp file is gone, the older files untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._written_dirs: set[Path] = set()  # dirs this run saved into: never silently created again

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        try:
            if path.parent in self._written_dirs and not path.parent.is_dir():
                # deleted or unmounted under the run: recreating it would scatter the run over two places
                raise FileNotFoundError(errno.ENOENT, "the directory is gone", str(path.parent))
            atomic_save(checkpoint, path)
        except Exception as e:
            failure = storage_failure(e)
            if failure is None:
                raise
            raise storage_error(failure, path, path.parent, tensor_bytes(checkpoint, set())) from None
        self._written_dirs.add(path.parent)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return read_checkpoint(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
