"""What a run shows while it trains: the metrics beyond the loss, text samples, hyperparameters and progress.

TrainingMonitor logs, against the optimizer step (the same step as train/loss and val/loss):
  every log_every_n_steps: train/grad_norm (before clipping), train/tokens_per_sec, train/tokens_seen and,
    on GPUs with a known peak, train/mfu;
  every validation: val/sample, text generated from a fixed prompt (TensorBoard's Text tab);
  once: the hyperparameters (HParams tab, with hparams/final_val_loss and hparams/best_val_loss when training ends),
    model/num_params and train/global_batch_size;
  optionally: weight and gradient histograms.
StepProgressBar is the progress bar over optimizer steps; LogLines replaces it with one plain line per log interval.
RunTensorBoardLogger is the default logger; RunCSVLogger writes the scalars to RUN/metrics.csv instead
(--logger csv), continuing the file when a run resumes.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import time
from typing import Any, Optional, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.profilers import PassThroughProfiler
from tensorboard.plugins.text.summary_v2 import text_pb

from nanogpt.errors import NanoGPTError
from nanogpt.generate import sample
from nanogpt.model import GPTConfig

# Dense bf16 tensor-core peaks in TFLOP/s, matched in order against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200", 989.0),  # the H100 SXM's compute with more memory
    ("A100", 312.0),  # SXM and PCIe alike
)


def gpu_peak_tflops(device_name: str) -> Optional[float]:
    """The bf16 peak of a GPU by its name, or None for a GPU (or CPU) not in GPU_PEAK_TFLOPS."""
    name = device_name.lower()
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in name:
            return tflops
    return None


def flops_per_token(config: GPTConfig, non_embedding_params: int) -> int:
    """Training FLOPs per token (forward + backward), as nanoGPT and the PaLM paper estimate them.

    6 per weight (2 forward, 4 backward) plus attention's q k^T and att v: 12 * n_layer * n_embd * block_size.
    """
    return 6 * non_embedding_params + 12 * config.n_layer * config.n_embd * config.block_size


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs train and val scalars at (the index of the last optimizer step), for other summaries."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def is_log_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer step that just ran (or is about to run) is one Lightning logs (log_every_n_steps)."""
    return not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs


# the training scalars a progress bar shows (as self.log(prog_bar=True) would mark them)
PROGRESS_BAR_TAGS = ("train/loss", "train/tokens_per_sec", "train/mfu")


def write_step_scalars(trainer: L.Trainer, scalars: dict[str, Any]) -> None:
    """Writes one optimizer step's training scalars to every logger at once; callbacks and the progress bar see them.

    What self.log(on_step=True) would do with them, without its per-call bookkeeping (about 0.5 ms a call on a CPU,
    ten calls per log interval): device tensors are read back together (one sync, on logging steps only), every
    value is logged at the step Lightning logs its own training scalars at, and lands in trainer.callback_metrics
    (as tensors, as for self.log: EarlyStopping and the like read them there) and trainer.progress_bar_metrics.
    """
    values = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in scalars.items() if isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        read = torch.stack([t.detach().float().reshape(()).to(device) for t in tensors.values()]).tolist()
        values.update(zip(tensors, read))
    step = log_step(trainer)
    for logger in trainer.loggers:  # rank 0 only: loggers ignore the call on other ranks
        logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    trainer.progress_bar_metrics.update({k: v for k, v in values.items() if k in PROGRESS_BAR_TAGS})


def tensorboard_writers(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers (none when logging to CSV only)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _sync(pl_module: L.LightningModule) -> None:
    # only at log steps and validation starts: wait for queued GPU work so the clock measures it
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class TrainingMonitor(Callback):
    """Logs throughput, gradient norm, MFU, text samples, hyperparameters and (optionally) histograms.

    Args:
        sample_prompt: the fixed text each validation's sample continues (its characters must be in the vocabulary).
        sample_tokens: characters generated per sample; 0 turns samples off.
        sample_temperature: sampling temperature; 0 picks the most likely character.
        sample_seed: seed of every sample, so successive samples differ only by what the model learned.
        histogram_every_n_steps: log weight and gradient histograms every this many steps; 0 (default) turns them off.
        peak_tflops: one device's peak TFLOP/s for train/mfu; default: looked up from the GPU's name
            (H100, H200, A100, bf16 dense); on CPUs and unknown GPUs no MFU is logged.
    """

    def __init__(
        self,
        sample_prompt: str = "\n",
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_seed: int = 1337,
        histogram_every_n_steps: int = 0,
        peak_tflops: Optional[float] = None,
    ) -> None:
        if not sample_prompt and sample_tokens > 0:
            raise NanoGPTError("monitor.sample_prompt is empty; give at least one character (the default is a newline)")
        if sample_tokens < 0:
            raise NanoGPTError(f"monitor.sample_tokens must be 0 (no samples) or more, got {sample_tokens}")
        if sample_temperature < 0:
            raise NanoGPTError(f"monitor.sample_temperature must be 0 or more, got {sample_temperature}")
        if histogram_every_n_steps < 0:
            raise NanoGPTError(f"monitor.histogram_every_n_steps must be 0 (off) or more, got {histogram_every_n_steps}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise NanoGPTError(f"monitor.peak_tflops must be positive, got {peak_tflops}; leave it unset to look it up")
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.sample_temperature = sample_temperature
        self.sample_seed = sample_seed
        self.histogram_every_n_steps = histogram_every_n_steps
        self.peak_tflops = peak_tflops
        # checkpointed (state_dict), so a resumed run continues these curves
        self.tokens_seen: Optional[int] = None
        self.best_val_loss: Optional[float] = None
        self.last_final_step: Optional[int] = None
        # the current throughput interval: wall time minus validation, and the tokens trained in it
        self.last_tokens_per_sec: Optional[float] = None
        self._interval_start = 0.0
        self._interval_tokens = 0
        self._paused_at: Optional[float] = None
        self._paused = 0.0
        self._flops_per_token = 0
        self._peak_flops: Optional[float] = None

    @property
    def state_key(self) -> str:
        return "TrainingMonitor"

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss, "last_final_step": self.last_final_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = state_dict.get("tokens_seen")
        self.best_val_loss = state_dict.get("best_val_loss")
        self.last_final_step = state_dict.get("last_final_step")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if self.sample_tokens > 0 and tokenizer is not None and tokenizer.unknown_chars(self.sample_prompt):
            raise NanoGPTError(
                f"monitor.sample_prompt {self.sample_prompt!r} has characters that are not in the data's vocabulary "
                f"({''.join(sorted(tokenizer.unknown_chars(self.sample_prompt)))!r}); pick a prompt from the corpus"
            )
        model = pl_module.model
        self._flops_per_token = flops_per_token(model.config, model.num_params(non_embedding=True))
        peak = self.peak_tflops
        if peak is None and pl_module.device.type == "cuda":
            peak = gpu_peak_tflops(torch.cuda.get_device_name(pl_module.device))
        self._peak_flops = peak * 1e12 * trainer.world_size if peak else None

    @staticmethod
    def _global_batch(trainer: L.Trainer) -> int:
        """Sequences in one optimizer step over all devices and accumulation micro-steps.

        data.batch_size is that global batch already (CharDataModule splits it into micro-batches); a data module
        without a batch plan is taken to give each device batch_size sequences per micro-step.
        """
        dm = trainer.datamodule
        plan = getattr(dm, "batch_plan", None)
        if plan is not None:
            return plan.global_batch
        return dm.batch_size * trainer.accumulate_grad_batches * trainer.world_size

    def _tokens_per_step(self, trainer: L.Trainer) -> int:
        """Tokens in one optimizer step over all devices: the global batch x block_size."""
        return self._global_batch(trainer) * trainer.datamodule.block_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.tokens_seen is None:  # a new run, or a checkpoint written before this callback existed
            self.tokens_seen = trainer.global_step * self._tokens_per_step(trainer)
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._log_once(trainer, pl_module)
        self._interval_start, self._interval_tokens, self._paused = time.perf_counter(), 0, 0.0

    def _log_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the start of a new run: hyperparameters for the HParams tab, parameter count and global batch."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        dm = trainer.datamodule
        num_params = pl_module.model.num_params()
        global_batch = self._global_batch(trainer)
        params: dict[str, Any] = {f"model/{k}": v for k, v in pl_module.hparams.items() if not k.startswith("_")}
        params.update({f"data/{k}": getattr(dm, k) for k in ("source", "batch_size", "val_fraction", "val_blocks", "seed")})
        params["data/tokenizer"] = pl_module.tokenizer.describe() if pl_module.tokenizer is not None else "char"
        params.update(
            {
                "trainer/max_steps": trainer.max_steps,
                "trainer/accumulate_grad_batches": trainer.accumulate_grad_batches,
                "trainer/gradient_clip_val": trainer.gradient_clip_val,
                "trainer/precision": trainer.precision,
                "trainer/world_size": trainer.world_size,
                "num_params": num_params,
                "global_batch_size": global_batch,
                "tokens_per_step": self._tokens_per_step(trainer),
            }
        )
        # the HParams plugin takes bool, number and string values only
        params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
        # the metrics' values come at train end (on_train_end); the experiment only declares their tags
        summaries = hparams_summary(params, {"hparams/final_val_loss": 0.0, "hparams/best_val_loss": 0.0})
        for writer in tensorboard_writers(trainer):
            for summary in summaries:
                writer._get_file_writer().add_summary(summary)
        for logger in trainer.loggers:
            logger.log_metrics({"model/num_params": num_params, "train/global_batch_size": global_batch}, step=0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._paused_at is not None:  # validation, checkpointing and sampling do not count as training time
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Lightning calls this after backward (and AMP unscaling) and before gradient clipping
        n = self.histogram_every_n_steps
        if not n:
            return
        step = log_step(trainer)
        if (step + 1) % n == 0 and trainer.is_global_zero:
            for writer in tensorboard_writers(trainer):
                for name, p in pl_module.model.named_parameters():
                    writer.add_histogram(f"weights/{name}", p.detach().float(), step)
                    if p.grad is not None:
                        writer.add_histogram(f"grads/{name}", p.grad.detach().float(), step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]  # (B, T) on this rank; every rank trains as many tokens
        tokens = x.numel() * trainer.world_size
        self._interval_tokens += tokens
        self.tokens_seen = (self.tokens_seen or 0) + tokens
        if not is_log_step(trainer):
            return
        _sync(pl_module)
        now = time.perf_counter()
        elapsed = now - self._interval_start - self._paused
        scalars: dict[str, Any] = {"train/tokens_seen": self.tokens_seen}
        if elapsed > 0:
            self.last_tokens_per_sec = self._interval_tokens / elapsed
            scalars["train/tokens_per_sec"] = self.last_tokens_per_sec
            if self._peak_flops:
                scalars["train/mfu"] = self._flops_per_token * self.last_tokens_per_sec / self._peak_flops
        grad_norm = getattr(pl_module, "grad_norm", None)  # GPTModule keeps it from its clipping: no second pass
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        step_scalars = getattr(pl_module, "step_scalars", None)
        if step_scalars is not None:
            step_scalars.update(scalars)  # GPTModule writes them with its own at the end of this step
        else:
            write_step_scalars(trainer, scalars)
        self._interval_start, self._interval_tokens, self._paused = now, 0, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            _sync(pl_module)
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            val_loss = float(val_loss)
            if self.best_val_loss is None or val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
        if self.sample_tokens > 0 and trainer.is_global_zero and tensorboard_writers(trainer):
            text = self.generate_sample(pl_module)
            # TensorBoard renders text as Markdown: indent by 4 spaces so lines and spacing stay as generated
            markdown = "\n".join("    " + line for line in text.split("\n"))
            # text_pb keeps the tag as given (SummaryWriter.add_text would append "/text_summary")
            summary = text_pb("val/sample", markdown)
            for writer in tensorboard_writers(trainer):
                writer._get_file_writer().add_summary(summary, log_step(trainer))

    def generate_sample(self, pl_module: L.LightningModule) -> str:
        """The fixed prompt and its continuation by the model as it is now (seeded: only the model varies)."""
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            # eager even when the model is compiled (--model.compile true): every decoding step has a new input
            # shape (the prompt, then one token of a growing sequence), so the compiled model would build graph
            # after graph for one sample, up to dynamo's recompile limit, at the first validation of every run
            with torch.compiler.set_stance("force_eager"):
                return sample(
                    pl_module.model,
                    pl_module.tokenizer,
                    self.sample_prompt,
                    max_new_tokens=self.sample_tokens,
                    temperature=self.sample_temperature,
                    seed=self.sample_seed,
                )[0]
        finally:
            pl_module.model.train(was_training)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = trainer.callback_metrics.get("val/loss")
        step = max(trainer.global_step - 1, 0)  # the last optimizer step, where its val/loss is logged
        if val_loss is None or self.best_val_loss is None or step == self.last_final_step:
            return  # no validation ran, or a resumed run that trained no further
        metrics = {"hparams/final_val_loss": float(val_loss), "hparams/best_val_loss": self.best_val_loss}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.last_final_step = step


class NoProfiler(PassThroughProfiler):
    """Lightning's default "no profiler", at a sixth of its cost: the trainer's default when --trainer.profiler is unset.

    Lightning wraps every hook of every callback in `profiler.profile(name)`, some 60 times a step; the
    pass-through one builds a generator context each time (about 1.4 us), this one hands back one null context.
    """

    _null = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return self._null


def format_count(value: float) -> str:
    """A compact count for progress output: 812, 12.3k, 4.56M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepProgressBar(TQDMProgressBar):
    """A tqdm bar over optimizer steps (of max_steps, so it shows the time left) with loss, val loss and tokens/s."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        # a resumed run starts at its step; tqdm's rate and time left count only the steps of this session
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = {"train/loss": "loss", "val/loss": "val_loss", "train/tokens_per_sec": "tok/s", "train/mfu": "mfu"}
        metrics = trainer.progress_bar_metrics
        out: dict[str, Any] = {}
        for tag, name in shown.items():
            if tag in metrics:
                value = float(metrics[tag])
                if tag == "train/tokens_per_sec":
                    out[name] = format_count(value)
                elif tag == "train/mfu":
                    out[name] = f"{100 * value:.1f}%"
                else:
                    out[name] = f"{value:.4f}"
        return out


class LogLines(Callback):
    """One plain line per log interval and one per validation instead of a progress bar (--quiet): for CI and files.

        step 100/300 | loss 2.4501 | val_loss 2.4712 | 12.3k tok/s | lr 2.81e-03 | elapsed 0:00:41 | left 0:01:22
    """

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream
        self._pending: Optional[int] = None  # a log step whose metrics Lightning has not handed over yet
        self._start = 0.0
        self._start_step = 0

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_log_step(trainer):
            # the step's logged values reach trainer.callback_metrics only after this hook: print at the next one
            self._pending = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "val/loss" in m:
            parts.append(f"val_loss {float(m['val/loss']):.4f}")
        if "train/tokens_per_sec" in m:
            parts.append(f"{format_count(float(m['train/tokens_per_sec']))} tok/s")
        if "train/mfu" in m:
            parts.append(f"mfu {100 * float(m['train/mfu']):.1f}%")
        if "train/lr" in m:
            parts.append(f"lr {float(m['train/lr']):.2e}")
        elapsed = time.perf_counter() - self._start
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = step - self._start_step
        if trainer.max_steps > 0 and done > 0:
            parts.append(f"left {format_duration(elapsed / done * max(trainer.max_steps - step, 0))}")
        self._print(trainer, " | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        parts = [f"step {trainer.global_step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {trainer.global_step}"]
        for tag in ("val/loss", "val/ppl", "val/bpc"):
            if tag in m:
                parts.append(f"{tag} {float(m[tag]):.4f}")
        self._print(trainer, " | ".join(parts))


def _drop_epoch(metrics: dict[str, Any]) -> dict[str, Any]:
    # Lightning adds "epoch" to every logged dict; the training stream is one endless epoch, so it is always 0
    # and, logged with both the train and the val scalars of a step, it would repeat steps
    return {k: v for k, v in metrics.items() if k != "epoch"}


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger writing events straight into RUN (no version dirs), so a resumed run continues its run."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name="", version="", default_hp_metric=False, **kwargs)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        super().log_metrics(_drop_epoch(metrics), step)


class _AppendingWriter(ExperimentWriter):
    """CSVLogger's writer, but an existing metrics.csv (a resumed run) is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            # know the file's columns, so a resumed run's new keys extend its header instead of replacing it
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """CSVLogger writing RUN/metrics.csv and RUN/hparams.yaml, continued (not overwritten) when the run resumes."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name="", version="", **kwargs)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        super().log_metrics(_drop_epoch(metrics), step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
