"""The metrics a run logs beyond the loss: throughput, gradient norm, MFU, text samples and hyperparameters.

TrainingMonitor logs, against the optimizer step (the same step as train/loss and val/loss):
  every log_every_n_steps: train/grad_norm (before clipping), train/tokens_per_sec, train/tokens_seen and,
    on GPUs with a known peak, train/mfu;
  every validation: val/sample, text generated from a fixed prompt (TensorBoard's Text tab);
  once: the hyperparameters (HParams tab, with hparams/final_val_loss and hparams/best_val_loss when training ends),
    and model/num_params (GPTModule logs the global batch's split as batch/*);
  optionally: weight and gradient histograms.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from nanogpt.data.datamodule import batch_plan_of
from nanogpt.errors import NanoGPTError
from nanogpt.generate import sample
from nanogpt.private import text_pb
from nanogpt.training.loggers import tensorboard_file_writers
from nanogpt.training.module import GPTModule, require_gpt_module
from nanogpt.training.peaks import gpu_peak_tflops, missing_peak_line
from nanogpt.model import GPTConfig
from nanogpt.training.steps import is_logging_step, logged_step

def flops_per_token(config: GPTConfig, non_embedding_params: int) -> int:
    """Training FLOPs per token (forward + backward), as nanoGPT and the PaLM paper estimate them.

    6 per weight (2 forward, 4 backward) plus attention's q k^T and att v: 12 * n_layer * n_embd * block_size.
    """
    return 6 * non_embedding_params + 12 * config.n_layer * config.n_embd * config.block_size

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
        peak_tflops: one device's peak TFLOP/s for train/mfu; default: looked up from the GPU's name and the run's
            precision (nanogpt/training/peaks.py, dense tensor-core peaks); a GPU not there says so in one line and
            logs no MFU; on CPUs no MFU is logged.
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_gpt_module(pl_module, self, "the model, tokenizer, gradient norm and hyperparameters")

    def on_fit_start(self, trainer: L.Trainer, pl_module: GPTModule) -> None:
        tokenizer = pl_module.tokenizer
        if self.sample_tokens > 0 and tokenizer is not None and tokenizer.unknown_chars(self.sample_prompt):
            raise NanoGPTError(
                f"monitor.sample_prompt {self.sample_prompt!r} has characters that are not in the data's vocabulary "
                f"({''.join(sorted(tokenizer.unknown_chars(self.sample_prompt)))!r}); pick a prompt from the corpus"
            )
        model = pl_module.model
        self._flops_per_token = flops_per_token(model.config, model.num_params(non_embedding=True))
        peak = self.peak_tflops
        if peak is None and pl_module.device.type == "cuda":
            # the peak of the precision in use: fp16 on a T4, bf16 on an A100 (none for 32-true: no tensor-core row)
            name = torch.cuda.get_device_name(pl_module.device)
            peak = gpu_peak_tflops(name, str(trainer.precision))
            if peak is None:
                rank_zero_info(missing_peak_line(name, trainer.precision))  # one line, not a silent gap
        self._peak_flops = peak * 1e12 * trainer.world_size if peak else None

    @staticmethod
    def _global_batch(trainer: L.Trainer) -> int:
        """Sequences in one optimizer step over all devices and accumulation micro-steps.

        data.batch_size is that global batch already (TextDataModule's batch plan splits it into micro-batches); other
        data is taken to give each device batch_size sequences per micro-step.
        """
        plan = batch_plan_of(trainer)
        if plan is not None:
            return plan.global_batch
        return trainer.datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size

    def _tokens_per_step(self, trainer: L.Trainer, pl_module: GPTModule) -> int:
        """Tokens in one optimizer step over all devices: the global batch x block_size."""
        return self._global_batch(trainer) * pl_module.config.block_size

    def on_train_start(self, trainer: L.Trainer, pl_module: GPTModule) -> None:
        if self.tokens_seen is None:  # a new run, or a checkpoint written before this callback existed
            self.tokens_seen = trainer.global_step * self._tokens_per_step(trainer, pl_module)
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._log_once(trainer, pl_module)
        self._interval_start, self._interval_tokens, self._paused = time.perf_counter(), 0, 0.0

    def _log_once(self, trainer: L.Trainer, pl_module: GPTModule) -> None:
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
                "tokens_per_step": self._tokens_per_step(trainer, pl_module),
            }
        )
        # the HParams plugin takes bool, number and string values only
        params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
        # the metrics' values come at train end (on_train_end); the experiment only declares their tags
        summaries = hparams_summary(params, {"hparams/final_val_loss": 0.0, "hparams/best_val_loss": 0.0})
        for writer in tensorboard_file_writers(trainer):
            for summary in summaries:
                writer.add_summary(summary)
        for logger in trainer.loggers:
            logger.log_metrics({"model/num_params": num_params}, step=0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._paused_at is not None:  # validation, checkpointing and sampling do not count as training time
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Lightning calls this after backward (and AMP unscaling) and before gradient clipping
        n = self.histogram_every_n_steps
        if not n:
            return
        step = trainer.global_step  # the index of the step about to be taken
        if (step + 1) % n == 0 and trainer.is_global_zero:
            for writer in [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]:
                for name, p in pl_module.model.named_parameters():
                    writer.add_histogram(f"weights/{name}", p.detach().float(), step)
                    if p.grad is not None:
                        writer.add_histogram(f"grads/{name}", p.grad.detach().float(), step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: GPTModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]  # (B, T) on this rank; every rank trains as many tokens
        tokens = x.numel() * trainer.world_size
        self._interval_tokens += tokens
        self.tokens_seen = (self.tokens_seen or 0) + tokens
        if not is_logging_step(trainer, batch_idx):
            return
        _sync(pl_module)
        now = time.perf_counter()
        elapsed = now - self._interval_start - self._paused
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        if elapsed > 0:
            tokens_per_sec = self._interval_tokens / elapsed
            pl_module.log("train/tokens_per_sec", tokens_per_sec)
            if self._peak_flops:
                mfu = self._flops_per_token * tokens_per_sec / self._peak_flops
                pl_module.log("train/mfu", mfu)
        grad_norm = pl_module.grad_norm  # GPTModule keeps it from its clipping: no second pass
        if grad_norm is not None:
            pl_module.log("train/grad_norm", grad_norm)  # a device tensor: read with the step's other scalars
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
        writers = tensorboard_file_writers(trainer) if trainer.is_global_zero else []
        if self.sample_tokens > 0 and writers:
            text = self.generate_sample(pl_module)
            # TensorBoard renders text as Markdown: indent by 4 spaces so lines and spacing stay as generated
            markdown = "\n".join("    " + line for line in text.split("\n"))
            # text_pb keeps the tag as given (SummaryWriter.add_text would append "/text_summary")
            summary = text_pb("val/sample", markdown)
            for writer in writers:
                writer.add_summary(summary, logged_step(trainer))

    def generate_sample(self, pl_module: GPTModule) -> str:
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
        step = logged_step(trainer)  # the last optimizer step, where its val/loss is logged
        if val_loss is None or self.best_val_loss is None or step == self.last_final_step:
            return  # no validation ran, or a resumed run that trained no further
        metrics = {"hparams/final_val_loss": float(val_loss), "hparams/best_val_loss": self.best_val_loss}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.last_final_step = step
