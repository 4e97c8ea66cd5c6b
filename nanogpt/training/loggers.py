"""Where a run's scalars go: TensorBoard events in RUN (the default), or RUN/metrics.csv (--logger csv).

Both write straight into the run dir (no version subdirectories) and continue when the run resumes.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


def _drop_epoch(metrics: Mapping[str, Any]) -> dict[str, Any]:
    # Lightning adds "epoch" to every logged dict; the training stream is one endless epoch, so it is always 0
    # and, logged with both the train and the val scalars of a step, it would repeat steps
    return {k: v for k, v in metrics.items() if k != "epoch"}


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger writing events straight into RUN (no version dirs), so a resumed run continues its run."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name="", version="", default_hp_metric=False, **kwargs)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        super().log_metrics(_drop_epoch(metrics), step)


def tensorboard_file_writers(trainer: L.Trainer) -> list[Any]:
    """The event file writers of the trainer's TensorBoard loggers (none when logging to CSV only), for summaries
    that SummaryWriter's add_* methods would rename (text) or put in another run (hparams)."""
    writers = [lg.experiment.file_writer for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    return [w for w in writers if w is not None]  # None only once a writer is closed


class RunCSVLogger(Logger):
    """Scalars in RUN/metrics.csv (a row per log call, a column per tag) and hyperparameters in RUN/hparams.yaml.

    A resumed run appends to the file it finds; a tag the file has no column for yet rewrites it with one more.
    Rows are written as they come, so a killed run keeps what it logged.
    """

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._root = Path(save_dir)
        self._columns: Optional[list[str]] = None  # the file's header, once read or written

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self._root)

    @property
    def log_dir(self) -> str:
        return str(self._root)

    @property
    def save_dir(self) -> str:
        return str(self._root)

    @property
    def metrics_file(self) -> Path:
        return self._root / "metrics.csv"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = dict(params) if isinstance(params, Mapping) else vars(params)
        self._root.mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(self._root / "hparams.yaml", params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in _drop_epoch(metrics).items()}}
        path = self.metrics_file
        if self._columns is None and path.is_file():
            with open(path, newline="") as f:
                self._columns = list(csv.DictReader(f).fieldnames or [])
        columns = self._columns or []
        new = [k for k in row if k not in columns]
        if new or not path.is_file():
            rows: list[dict[str, Any]] = []
            if path.is_file():
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
            columns = columns + new
            self._root.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows + [row])
            self._columns = columns
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(row)
