"""The training command line: LightningCLI with a run directory per run.

    python train.py --config configs/shakespeare_char.yaml [--trainer.* --model.* --data.*] [--ckpt_path last|auto|FILE]

Everything a run writes lives in its run dir (--trainer.default_root_dir, default out/<config name>):
checkpoints in RUN/checkpoints (last.ckpt, best.ckpt), TensorBoard events and the resolved config.yaml in RUN.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import lightning
import torch
from jsonargparse import ActionYesNo, ArgumentError
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision

from nanogpt.training.checkpointing import run_checkpoints
from nanogpt.training.cluster import one_checkpoint_mechanism, requeue_job, restart_hint, stop_signals, wants_requeue
from nanogpt.io import pick_resume_checkpoint, read_checkpoint, storage_error, storage_failure
from nanogpt.training.checkpoint_io import RunCheckpointIO
from nanogpt.data.datamodule import TextDataModule
from nanogpt.training.strategies import apply_ddp_defaults
from nanogpt.errors import NanoGPTError, exit_with, hide_srun_hint
from nanogpt.training.fault import FaultTolerance, TrainingInterrupted
from nanogpt.training.module import GPTModule, refuse_resume_into
from nanogpt.training.precision import cpu_fp16_plugin, resolve_precision
from nanogpt.hf.pretrained import PRETRAINED_FIELDS, pretrained_settings
from nanogpt.private import TESTED_LIGHTNING_VERSIONS, is_tested_lightning
from nanogpt.training.loggers import RunCSVLogger, RunTensorBoardLogger
from nanogpt.training.metrics import TrainingMonitor
from nanogpt.training.progress import LogLines, StepProgressBar
from nanogpt.training.rollback import Rollback, fit_with_rollbacks
from nanogpt.training.runlock import RunLock, is_global_rank_zero

# Trainer settings that suit step-based GPT training; a config file or flag overrides each.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": -1,  # the training stream is endless: max_steps ends the run
    "max_steps": 5000,
    "val_check_interval": 250,  # optimizer steps between validations (apply_batch_plan scales it by the accumulation)
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
    "num_sanity_val_steps": 0,
}


def run_dir_for(config_files: list[Any]) -> Path:
    """The default run dir: out/<name of the last config file>, or out/default without one."""
    return Path("out") / (Path(str(config_files[-1])).stem if config_files else "default")


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """Turns --ckpt_path into a file path, refusing anything that would lose or overwrite a run's checkpoints.

    auto (the command a scheduler restarts): resume as last does when the run dir holds checkpoints, else None.
    """
    ckpt_dir = run_dir / "checkpoints"
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if ckpt_path is None:
        if existing:
            raise NanoGPTError(
                f"run dir {run_dir} already holds checkpoints ({', '.join(p.name for p in existing)}); "
                "resume it with --ckpt_path last, or start a new run with another --trainer.default_root_dir"
                + restart_hint()
            )
        return None
    if ckpt_path == "auto":
        if not existing:
            return None  # a first start: nothing to resume
        try:
            return str(pick_resume_checkpoint(ckpt_dir))
        except NanoGPTError as e:  # the same refusals as last, named as the flag the user gave
            raise NanoGPTError(str(e).replace("--ckpt_path last:", "--ckpt_path auto:", 1)) from None
    if ckpt_path == "last":
        # last.ckpt, or the newest readable step checkpoint when it is damaged (saying so); never a silent fresh start
        return str(pick_resume_checkpoint(ckpt_dir))
    if ckpt_path == "best" and not Path(ckpt_path).is_file():
        ckpt_path = str(ckpt_dir / "best.ckpt")  # the lowest val/loss so far (a file named "best" here wins)
    path = Path(ckpt_path)
    if not path.is_file():
        raise NanoGPTError(f"checkpoint {ckpt_path} does not exist; pass an existing .ckpt file or --ckpt_path last")
    read_checkpoint(path, mmap=True)  # a corrupt, truncated, empty or unsafe file: one error naming it, now
    return str(path)


class GPTLightningCLI(LightningCLI):
    """LightningCLI for GPTModule and TextDataModule, with a run dir, resume and sensible defaults.

    run_dir_lock: where the run dir's lock (nanogpt/training/runlock.py) is held until the run ends; main() passes an
    ExitStack it closes on every exit. None (a CLI built in process, as tests do) takes no lock.
    """

    def __init__(self, args: Optional[list[str]] = None, run_dir_lock: Optional[ExitStack] = None) -> None:
        self.run_dir_lock = run_dir_lock
        self.ckpt_path: Optional[str] = None
        self.resume_step = 0  # the step the run continues from (0 for a new run)
        self._resume_checkpoint: Optional[dict[str, Any]] = None  # its tokenizer and model settings, when resuming
        super().__init__(
            GPTModule,
            TextDataModule,
            args=args,
            run=False,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            auto_configure_optimizers=False,
            # raise instead of printing the whole usage: main() reports the one line that matters
            parser_kwargs={"exit_on_error": False},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],
            default=None,
            help="resume from 'last' (RUN/checkpoints/last.ckpt), 'best' (RUN/checkpoints/best.ckpt) or a file; "
            "'auto' resumes as last when the run dir holds checkpoints, else starts fresh (jobs a scheduler restarts)",
        )
        parser.add_argument(
            "--logger",
            type=Literal["tensorboard", "csv"],
            default="tensorboard",
            help="where scalars go: TensorBoard events in RUN, or RUN/metrics.csv (text samples need TensorBoard)",
        )
        parser.add_argument(
            "--quiet",
            action=ActionYesNo,
            default=False,
            help="one line per log interval instead of a progress bar (CI, log files)",
        )
        # --monitor.*: throughput, grad norm, MFU, text samples, hparams, histograms (nanogpt/training/metrics.py)
        parser.add_lightning_class_args(TrainingMonitor, "monitor")
        # --fault.*: what a bad step (NaN, inf, a loss spike) does: roll back or stop (nanogpt/training/rollback.py)
        parser.add_lightning_class_args(Rollback, "fault")
        parser.add_argument(
            "--checkpoint.every_n_steps",
            type=Optional[int],
            default=None,
            help="also write last.ckpt every this many optimizer steps (default: only at validations and the end)",
        )
        parser.add_argument(
            "--checkpoint.keep_last_k",
            type=int,
            default=2,
            help="keep this many step-N.ckpt files (older good checkpoints) besides last.ckpt and best.ckpt",
        )
        parser.add_argument(
            "--checkpoint.async_save",
            type=bool,
            default=True,
            help="write checkpoints in a background thread: a save blocks training only while the state is copied",
        )
        parser.link_arguments("model.block_size", "data.block_size")
        # only the data knows the vocabulary: hand its size to the model once the data module exists
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config
        trainer = config.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = str(run_dir_for(config.get("config") or []))
        # by the GPU's tensor cores unless given (nanogpt/training/precision.py); the run's first line says which
        precision = resolve_precision(trainer.precision, trainer.accelerator)
        trainer.precision = precision.precision
        if is_global_rank_zero():
            rank_zero_info(precision.describe())
        if self.run_dir_lock is not None and is_global_rank_zero():
            # before anything looks at or writes into the run dir (checkpoint checks, config.yaml, events): a second
            # start while this run is live stops here, having touched nothing
            self.run_dir_lock.enter_context(RunLock(trainer.default_root_dir))
        self.ckpt_path = resolve_ckpt_path(config.ckpt_path, Path(trainer.default_root_dir))
        if self.ckpt_path is not None:
            checkpoint = read_checkpoint(self.ckpt_path, mmap=True)
            self.resume_step = int(checkpoint["global_step"])
            self._resume_checkpoint = {k: checkpoint.get(k) for k in ("tokenizer", "hyper_parameters")}
        if config.model.init_from:
            self._shape_from_pretrained(config)
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # TF32 matmuls: free speed on Ampere and newer

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._resume_checkpoint is not None:
            # a resume the checkpoint refuses, refused before any process starts: under a launcher every rank
            # finds it, and main() has rank 0 alone say it (GPTModule checks again as the checkpoint loads)
            refuse_resume_into(self._resume_checkpoint, self.datamodule.tokenizer, dict(self.model.hparams))

    def _shape_from_pretrained(self, config: Any) -> None:
        """--model.init_from: the model's shape and the data's tokenizer are the pretrained folder's."""
        model, defaults = config.model, self.parser.get_defaults()
        spec = model.init_from
        user_set = {k: model[k] for k in (*PRETRAINED_FIELDS, "block_size") if model[k] != defaults.model[k]}
        for name, value in pretrained_settings(spec, user_set).items():
            model[name] = value
        config.data.block_size = model.block_size
        if config.data.tokenizer not in (defaults.data.tokenizer, spec):
            raise NanoGPTError(f"--model.init_from {spec} brings its own tokenizer, but --data.tokenizer is "
                               f"{config.data.tokenizer}; drop --data.tokenizer")
        config.data.tokenizer = spec

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config_init  # no subcommands: the sections sit at the top
        trainer_config = config.get("trainer") or {}
        run_dir = trainer_config["default_root_dir"]
        if trainer_config.get("logger") in (None, True):
            # events straight in RUN (no lightning_logs/version_N): a resumed run continues the same run
            # purge_step: events a crashed run logged after the checkpoint we resume from are dropped, so the
            # resumed curves have no duplicate steps (a new run in a dir without checkpoints purges from 0)
            if config.get("logger") == "csv":
                kwargs["logger"] = RunCSVLogger(save_dir=run_dir)
            else:
                kwargs["logger"] = RunTensorBoardLogger(save_dir=run_dir, purge_step=self.resume_step)
        # the non-finite flags are read at log steps by the --fault callback (Rollback), which rolls back or stops
        callbacks = list(trainer_config.get("callbacks") or []) + [FaultTolerance(check_at_log_steps=False)]
        if trainer_config.get("enable_checkpointing") is not False:
            checkpoint = self.config.get("checkpoint")
            callbacks += run_checkpoints(
                str(Path(run_dir) / "checkpoints"), checkpoint.every_n_steps, checkpoint.keep_last_k
            )
        # progress: one line per log interval with --quiet, else a bar over optimizer steps (unless one is given)
        if config.get("quiet"):
            kwargs["enable_progress_bar"] = False
            callbacks.append(LogLines())
        elif trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            # redraw every log_every_n_steps steps (when the loss changes), not every batch: a redraw costs
            # 1-3 ms, a few percent of a CPU step
            every = max(1, trainer_config.get("log_every_n_steps") or TRAINER_DEFAULTS["log_every_n_steps"])
            callbacks.append(StepProgressBar(refresh_rate=every))
        kwargs["callbacks"] = callbacks
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # writes in the run dir itself (not $TMPDIR), fsynced, renamed; once per save, the other names linked
            plugins.append(RunCheckpointIO(async_save=self.config.get("checkpoint").async_save))
        fp16 = cpu_fp16_plugin(trainer_config.get("precision"), trainer_config.get("accelerator"))
        if fp16 is not None and not any(isinstance(p, Precision) for p in plugins):
            plugins.append(fp16)  # fp16 on a CPU as asked, not Lightning's bf16 in its place
            kwargs["precision"] = None  # the plugin is the precision; Lightning refuses both
        kwargs["plugins"] = one_checkpoint_mechanism(plugins)  # under SLURM: Lightning's auto-requeue off
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:  # e.g. more devices than the machine has, a bad name
            raise NanoGPTError(f"bad trainer settings: {' '.join(str(e).split())}") from None
        apply_ddp_defaults(trainer.strategy)
        if not is_tested_lightning():
            rank_zero_warn(
                f"lightning {lightning.__version__} is not a release nanogpt was tested with "
                f"({', '.join(TESTED_LIGHTNING_VERSIONS)}); see nanogpt/private.py"
            )
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.strategy.root_device.type == "cpu":
            raise NanoGPTError(
                "FSDP needs GPUs (PyTorch's FSDP does not run on CPU); use --trainer.accelerator gpu, "
                "or --trainer.strategy ddp to train on CPU processes"
            )
        # the world size is known once the Trainer exists: plan the global batch now (refusing one that does not
        # divide before any process is launched), with validation counted in optimizer steps
        self.datamodule.apply_batch_plan(trainer)
        return trainer


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's start-up tips for its cloud products (litlogger, litmodels): the console shows the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\N{ELECTRIC LIGHT BULB} Tip:" not in record.getMessage()


def silence_lightning_tips() -> None:
    # Lightning prints them with rank_zero_info on this logger, with no setting to turn them off
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in logger.filters):
        logger.addFilter(_NoAdvertisements())


class _SignalledOutsideTraining(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_exit() -> Iterator[Callable[[], None]]:
    """SIGTERM or SIGUSR1 before training starts exits through Python, so the run dir's lock is released; while
    training runs, FaultTolerance's handlers take their place and checkpoint first.

    Yields `finished`, to call once training has ended: SLURM's time-limit warning (SIGUSR1) is then ignored for
    the rest of the process, since there is nothing left to save or requeue (its default action would kill the
    process, and SLURM would mark a complete job as failed).
    """

    def stop(signum: int, frame: Any) -> None:
        raise _SignalledOutsideTraining(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in stop_signals():
            if signum != signal.SIGINT:  # Ctrl-C stays Python's KeyboardInterrupt
                previous[signum] = signal.signal(signum, stop)
    except ValueError:  # not the main thread: leave signals alone
        pass
    def finished() -> None:
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 in previous:
            signal.signal(usr1, signal.SIG_IGN)
            previous[usr1] = signal.SIG_IGN  # and so it stays when this block ends

    try:
        yield finished
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _storage_failures_reported_once() -> Iterator[None]:
    """A write that fails for lack of space or access in a background thread (TensorBoard's event writer) is
    raised again in the main thread at its next write, and reported there in one line: the thread stays quiet."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or storage_failure(args.exc_value) is None:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of train.py and nanogpt-train."""
    # Lightning warnings that do not apply: our IterableDatasets run in the main process (num_workers=0), so their
    # __len__ is exact, and the LeafSpec deprecation is Lightning's own use of a torch API
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    silence_lightning_tips()
    hide_srun_hint()
    if hasattr(signal, "SIGXFSZ"):
        # a file size limit (ulimit -f) then fails the write with EFBIG, reported below, instead of killing the run
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cli: Optional[GPTLightningCLI] = None
    try:
        # the run dir's lock is released as this block ends, however it ends (a return, an error, a signal)
        with _signals_exit() as training_finished, ExitStack() as run_dir_lock, _storage_failures_reported_once():
            cli = GPTLightningCLI(args, run_dir_lock=run_dir_lock)
            fit_with_rollbacks(cli.trainer, cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path)
            training_finished()
    except (TrainingInterrupted, _SignalledOutsideTraining) as e:
        # the run dir's lock is released by now: a requeued job may take it at once. Every rank stopped at the same
        # step: rank 0 says so for all
        if not is_global_rank_zero():
            pass
        elif isinstance(e, TrainingInterrupted):
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        else:
            print(f"stopped: {signal.Signals(e.signum).name} received outside the training loop", file=sys.stderr,
                  flush=True)
        if wants_requeue(e.signum):
            requeue_job()
        sys.exit(128 + e.signum)
    except NanoGPTError as e:  # StorageError (exit 3) included: checkpoint writes report their own failures
        if cli is None and not is_global_rank_zero():
            # a start refused before training: every rank read the same command and files, rank 0 says it once
            sys.exit(e.exit_code)
        exit_with(e)
    except ArgumentError as e:
        if not is_global_rank_zero():
            sys.exit(2)  # rank 0 reports the same command's mistake
        message = " ".join(str(e).split())  # jsonargparse's messages can span lines
        print(f"error: {message} (see train.py --help for the accepted options)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training (Lightning handles it inside)
        print("stopped: interrupted (Ctrl-C) outside training", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # any other write into the run dir that failed for lack of space or access (TensorBoard events, config.yaml)
        failure = storage_failure(e)
        if failure is None:
            raise
        run_dir = Path(cli.trainer.default_root_dir) if cli is not None else None
        error = storage_error(failure, failure.filename, run_dir / "checkpoints" if run_dir else None)
        exit_with(error)
