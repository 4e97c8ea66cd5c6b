"""The LightningModule: trains a GPT (optimizer, LR schedule, metrics, logging, tokenizer in checkpoints)."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics import MeanMetric

from nanogpt.data.datamodule import TextDataModule, batch_plan_of
from nanogpt.training.resume import capture_rng_state, check_resume_config, restore_rng_state
from nanogpt.training.strategies import all_reduce
from nanogpt.errors import NanoGPTError
from nanogpt.private import leaves_gradients_scaled
from nanogpt.training.fault import NonFiniteGuard
from nanogpt.model import GPT, Activation, GPTConfig, from_fields
from nanogpt.training.optim import (
    OptimizerName,
    OptimizerSettings,
    ScheduleName,
    build_optimizer,
    build_schedule,
    parameter_roles,
)
from nanogpt.hf.pretrained import load_pretrained_weights
from nanogpt.training.steps import is_logging_step
from nanogpt.tokenizers.char import CharTokenizer, Tokenizer, tokenizer_from_dict


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing put in its path (torch.compile
    compiles the model in place, see configure_model, so it adds none)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name




class GPTModule(L.LightningModule):
    """Trains a GPT (on characters or subword tokens).

    Args:
        vocab_size: number of tokens; linked from the data by the CLI.
        block_size, n_layer, n_head, n_embd, dropout, bias, activation: the network's shape (see GPTConfig).
        learning_rate: peak AdamW learning rate, reached after warmup_steps.
        min_lr: the AdamW learning rate at the end of the schedule (Muon's ends at the same fraction of muon_lr).
        warmup_steps: optimizer steps of linear warmup.
        decay_steps: optimizer step where the schedule reaches min_lr (default: trainer.max_steps).
        weight_decay: AdamW weight decay, applied only to tensors of two or more dims (matmuls, embeddings).
        beta1, beta2: AdamW betas.
        optimizer: "adamw" for every weight, or "muon": torch.optim.Muon for the transformer blocks' 2-D weight
            matrices and AdamW for embeddings, biases and LayerNorm gains (not with FSDP; see nanogpt/training/optim.py).
        muon_lr: peak Muon learning rate (with optimizer "muon").
        muon_momentum: Muon's (Nesterov) momentum.
        muon_weight_decay: Muon's decoupled weight decay on the block matrices.
        muon_ns_steps: Newton-Schulz iterations that orthogonalise each Muon update (torch's default 5; fewer are
            cheaper per step and a little rougher).
        schedule: "cosine" (warmup, then cosine down to min_lr) or "wsd" (warmup, constant, then a linear
            cool-down to min_lr over the last cooldown_fraction of decay_steps).
        cooldown_fraction: the share of decay_steps the "wsd" cool-down takes.
        compile: compile the inner model with torch.compile.
        init_from: start from pretrained weights: a Hugging Face GPT-2 folder or hf:NAME (the shape must be the
            folder's; the CLI takes it from there). Loaded when fit starts; a resumed run keeps its checkpoint's.
    """

    # The defaults are GPTConfig's and OptimizerSettings' (the one place each is written); the arguments are spelled
    # out because LightningCLI builds the --model.* flags, and load_from_checkpoint the module, from this signature.
    def __init__(
        self,
        vocab_size: int = GPTConfig.vocab_size,
        block_size: int = GPTConfig.block_size,
        n_layer: int = GPTConfig.n_layer,
        n_head: int = GPTConfig.n_head,
        n_embd: int = GPTConfig.n_embd,
        dropout: float = GPTConfig.dropout,
        bias: bool = GPTConfig.bias,
        activation: Activation = GPTConfig.activation,
        learning_rate: float = OptimizerSettings.learning_rate,
        min_lr: float = OptimizerSettings.min_lr,
        warmup_steps: int = OptimizerSettings.warmup_steps,
        decay_steps: Optional[int] = OptimizerSettings.decay_steps,
        weight_decay: float = OptimizerSettings.weight_decay,
        beta1: float = OptimizerSettings.beta1,
        beta2: float = OptimizerSettings.beta2,
        compile: bool = False,
        optimizer: OptimizerName = OptimizerSettings.optimizer,
        muon_lr: float = OptimizerSettings.muon_lr,
        muon_momentum: float = OptimizerSettings.muon_momentum,
        muon_weight_decay: float = OptimizerSettings.muon_weight_decay,
        muon_ns_steps: int = OptimizerSettings.muon_ns_steps,
        schedule: ScheduleName = OptimizerSettings.schedule,
        cooldown_fraction: float = OptimizerSettings.cooldown_fraction,
        init_from: Optional[str] = None,
    ) -> None:
        super().__init__()
        # LightningCLI adds `_instantiator`, an import path that load_from_checkpoint would import: hyperparameters
        # (in checkpoints and hparams.yaml) stay plain values that name no code
        self.save_hyperparameters(ignore=["_instantiator", "_class_path"])
        try:
            self.config: GPTConfig = from_fields(GPTConfig, self.hparams)
        except ValueError as e:
            raise NanoGPTError(str(e)) from None
        self.optim_settings: OptimizerSettings = from_fields(OptimizerSettings, self.hparams)
        self.model = GPT(self.config)
        # which optimizer and weight decay each parameter gets: decided on the true shapes now, by name, because
        # under FSDP configure_optimizers sees parameters flattened into 1-D shards
        self._param_roles = parameter_roles(self.model, optimizer)
        self.val_loss = MeanMetric()
        self._step_lr = 0.0  # the learning rate of the optimizer step in progress (train/lr)
        self._loss_sum: Optional[torch.Tensor] = None  # () the optimizer step's micro-batch losses so far, detached
        self.tokenizer: Optional[Tokenizer] = None
        self.val_bpb = MeanMetric()  # bits per UTF-8 byte: one yardstick across tokenizers
        self._token_bytes: Optional[torch.Tensor] = None  # (vocab,) UTF-8 bytes of each token id, for val/bpb
        # the step's total gradient norm before clipping, a device tensor (train/grad_norm, the non-finite guard)
        self.grad_norm: Optional[torch.Tensor] = None
        self._trained_params: list[torch.nn.Parameter] = []  # set in configure_optimizers
        self.nonfinite = NonFiniteGuard()  # read by FaultTolerance every log interval and before each checkpoint
        # the RNG states at the step boundary where validation began, put back before the next step
        # (see on_validation_start); None while training draws on undisturbed
        self._boundary_rng: Optional[dict[str, Any]] = None

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        _, loss = self.model(x, y)
        self.nonfinite.see_loss(loss)  # on a GPU no sync; a CPU reads a float (waits for nothing)
        # the sum of the step's micro-batch losses for train/loss: a device op, no sync (none at all without
        # gradient accumulation); read on logging steps only
        seen = loss.detach()
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # the step's first micro-batch
            self._loss_sum = seen
            # the rate this step trains at (a float, no sync): by on_train_batch_end the scheduler holds the next one
            self._step_lr = self.optimizers().param_groups[0]["lr"]
        else:
            self._loss_sum = self._loss_sum + seen
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_logging_step(self.trainer, batch_idx):
            return  # nothing logged, nothing read back from the device
        # the mean loss of the whole global batch: over the step's micro-batches and, on several devices, over all
        # ranks (one scalar all-reduce every log_every_n_steps steps; every rank takes this branch together)
        mean = self._loss_sum / self.trainer.accumulate_grad_batches
        if self.trainer.world_size > 1:
            mean = all_reduce(mean, "mean", self.trainer.strategy)
        # not prog_bar=True: Lightning converts progress-bar values to floats after every batch, the cached ones of
        # earlier steps too (a host-device sync per step on GPUs); StepProgressBar reads callback_metrics instead
        self.log("train/loss", mean)
        self.log("train/lr", self._step_lr)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        # weight by tokens so the epoch value is the mean over all validation characters, on any number of ranks
        self.val_loss.update(loss, weight=y.numel())
        if self._token_bytes is not None:
            # weighted by bytes, the epoch mean is the validation text's total bits over its total bytes
            if self._token_bytes.device != y.device:
                self._token_bytes = self._token_bytes.to(y.device)  # once: (vocab,) on the batch's device
            n_bytes = self._token_bytes[y].sum()
            self.val_bpb.update(loss * y.numel() / (math.log(2) * n_bytes), weight=n_bytes)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks
        self.val_loss.reset()
        # the values are already equal on every rank; sync_dist only spares Lightning's warning (3 scalars)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        if self.tokenizer is None or self.tokenizer.kind == "char":
            self.log("val/bpc", loss / math.log(2), sync_dist=True)  # nats per character -> bits per character
        if self._token_bytes is not None:
            self.log("val/bpb", self.val_bpb.compute(), sync_dist=True)
            self.val_bpb.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(_plain_name(name), p) for name, p in self.model.named_parameters() if p.requires_grad]
        self._trained_params = [p for _, p in named]  # for clipping every step (a module walk costs ~0.1 ms)
        if self.optim_settings.optimizer == "muon" and isinstance(self.trainer.model, FullyShardedDataParallel):
            raise NanoGPTError(
                "--model.optimizer muon needs whole 2-D weight matrices, which FSDP shards: "
                "use --model.optimizer adamw with FSDP"
            )
        optimizer = build_optimizer(named, self._param_roles, self.optim_settings, self.device)
        scheduler = build_schedule(optimizer, self.optim_settings, self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        """Clips to Trainer(gradient_clip_val) by the global norm, and keeps that norm (before clipping).

        Lightning's own clipping throws the norm away; here it is computed once and serves three jobs: clipping,
        train/grad_norm (TrainingMonitor) and the non-finite guard, all without reading it back to the host.
        Under FSDP the gradients are sharded, so FSDP's own clip_grad_norm_ computes the norm over all ranks
        (Lightning refuses norm clipping with FSDP for that reason).
        """
        if gradient_clip_algorithm not in (None, "norm"):  # clipping by value: Lightning's way, the norm aside
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16's GradScaler
        if scaler is not None and leaves_gradients_scaled(optimizer):
            # a fused AdamW unscales inside its step, so Lightning left the gradients multiplied by the loss scale
            # (65536 at first): clip and report the true norm, as the GradScaler docs do before clipping
            scaler.unscale_(optimizer)
        wrapped = self.trainer.model
        clip = gradient_clip_val if gradient_clip_val and gradient_clip_algorithm in (None, "norm") else None
        if isinstance(wrapped, FullyShardedDataParallel):
            self.grad_norm = wrapped.clip_grad_norm_(clip if clip is not None else float("inf"))
        elif clip is not None:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self._trained_params, clip, foreach=True)
        else:
            grads = [p.grad for p in self._trained_params if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # with fp16 a GradScaler skips steps with inf gradients by design: leave those to it
        self.nonfinite.see_step(optimizer, self.grad_norm, self.global_step, check_grads=scaler is None)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer.step(closure=optimizer_closure)
        # nanoGPT's order: free the gradients as soon as the update is done. Lightning zeroes them later, after the
        # next forward pass, so they would sit in memory beside its activations (a higher peak) and be freed in
        # the middle of the step. The next backward pass starts from None either way, so the numbers are the same
        optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # done in optimizer_step, right after the update; before the first step there are no gradients

    def configure_model(self) -> None:
        if self.hparams.compile:
            # in place: parameter names (and checkpoints) stay those of the plain model. dynamic=False: train
            # and validation batches have fixed shapes, so each shape compiles once and is never recompiled
            # into a slower shape-generic kernel (the last, smaller validation batch gets its own graph)
            self.model.compile(dynamic=False)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from:
            # every rank reads the same files; when resuming, Lightning then puts the checkpoint's weights over these
            load_pretrained_weights(self.model, self.hparams.init_from)
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, TextDataModule):  # set up before this module (see nanogpt/training/__init__.py)
            self._set_tokenizer(datamodule.tokenizer)
            if self.tokenizer.vocab_size != self.config.vocab_size:
                raise NanoGPTError(
                    f"model.vocab_size is {self.config.vocab_size} but the data has {self.tokenizer.vocab_size} "
                    "tokens; leave vocab_size unset so it is taken from the data"
                )

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        counts = tokenizer.token_bytes()  # None for a subword tokenizer whose tokens have no fixed bytes
        self._token_bytes = None if counts is None else torch.as_tensor(counts)

    def on_train_start(self) -> None:
        # the split of the global batch in use, once: on the console and as scalars at the start step
        plan = batch_plan_of(self.trainer)
        if plan is not None:
            rank_zero_info(f"batch: {plan.describe()}")
            if self.logger is not None:  # loggers write on rank 0 only
                self.logger.log_metrics(
                    {
                        "batch/global": plan.global_batch,
                        "batch/micro": plan.micro_batch,
                        "batch/accumulation": plan.accumulation,
                        "batch/world_size": plan.world_size,
                    },
                    step=self.global_step,
                )

    # Exact resume: dropout draws from the global RNGs, so a checkpoint carries their state at its step boundary.
    # Between two training steps only validation (and the text sample after it) might draw from them: their state
    # is taken where validation starts and put back before the next step, so the training stream of random numbers
    # depends only on the steps taken. Any other save happens at a step boundary with nothing drawn since (backward
    # and AdamW draw nothing), and takes the state as it is. Nothing is captured on ordinary steps.
    def on_validation_start(self) -> None:
        if self._boundary_rng is None:  # (already set after a resume: the checkpoint's state is the one to keep)
            self._boundary_rng = capture_rng_state()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._boundary_rng is not None:
            restore_rng_state(self._boundary_rng)
            self._boundary_rng = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_dict()
        state = self._boundary_rng if self._boundary_rng is not None else capture_rng_state()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            states: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(states, state)  # every rank's own stream, by global rank
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_resume_into(checkpoint, self.tokenizer, dict(self.hparams))
        stored = checkpoint.get("tokenizer")
        stored = None if stored is None else tokenizer_from_dict(stored)
        states = checkpoint.get("rng_states")
        try:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        except RuntimeError:  # load_from_checkpoint: no trainer
            rank, world = 0, 1
        if states and len(states) == world:
            self._boundary_rng = states[rank]
        elif states:
            rank_zero_warn(
                f"the checkpoint holds RNG states for {len(states)} processes but this run has {world}: "
                "training resumes, but its random dropout masks will differ from an uninterrupted run"
            )
        if stored is not None:
            self._set_tokenizer(stored)


def refuse_resume_into(checkpoint: dict[str, Any], tokenizer: Optional[Tokenizer], hparams: dict[str, Any]) -> None:
    """Raises the one-line reason a run with this tokenizer and these model settings cannot resume checkpoint.

    The tokenizer first: a new tokenizer also changes vocab_size, and its message names the cause.
    """
    stored = checkpoint.get("tokenizer")
    stored = None if stored is None else tokenizer_from_dict(stored)
    if stored is not None and tokenizer is not None and stored != tokenizer:
        raise NanoGPTError(tokenizer_change(stored, tokenizer))
    stored_hparams = checkpoint.get("hyper_parameters")
    if isinstance(stored_hparams, dict):
        check_resume_config(stored_hparams, hparams)


def tokenizer_change(stored: Tokenizer, current: Tokenizer) -> str:
    """Why a run cannot resume: its checkpoint's tokenizer is not the data's (one line naming both)."""
    if isinstance(stored, CharTokenizer) and isinstance(current, CharTokenizer):
        added = sorted(set(current.chars) - set(stored.chars))
        removed = sorted(set(stored.chars) - set(current.chars))
        return (
            f"the checkpoint's vocabulary differs from the data's (new characters {added}, missing {removed}); "
            "resume with the data the run was trained on, or start a new run"
        )
    return (
        f"the checkpoint's tokenizer is {stored.describe()} but the data's is {current.describe()}; "
        "resume with the --data.tokenizer the run was trained with, or start a new run"
    )


def require_gpt_module(pl_module: L.LightningModule, callback: object, reads: str) -> GPTModule:
    """pl_module, checked to be the GPTModule whose state the callback reads (what it reads, in words).

    Callbacks call this in their setup hook, so any other LightningModule fails before training starts, in one line.
    """
    if not isinstance(pl_module, GPTModule):
        raise TypeError(
            f"{type(callback).__name__} reads {reads} of a nanogpt.training.module.GPTModule, but the Trainer runs a "
            f"{type(pl_module).__name__}; train a GPTModule, or leave {type(callback).__name__} out of the callbacks"
        )
    return pl_module
