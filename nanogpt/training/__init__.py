"""The training layer: the LightningModule (module.py), its optimizer and schedule (optim.py), the callbacks
(checkpointing.py, fault.py, metrics.py, progress.py), loggers, strategies, and the command line (cli.py).

Contracts. A callback that reads the module's state (FaultTolerance: its NonFiniteGuard; TrainingMonitor: the model,
tokenizer and gradient norm) checks in its setup hook that the module is a GPTModule (require_gpt_module) and stops
there with one line otherwise. The split of the global batch is planned once per Trainer by
TextDataModule.apply_batch_plan (accumulation, and val_check_interval counted in optimizer steps), and read through
batch_plan_of(trainer) (nanogpt/data/datamodule.py).

The order of Lightning hooks this layer relies on, written down here only:
1. Building the CLI: the run dir's lock, --ckpt_path and --model.init_from are resolved (before_instantiate_classes),
   then the TextDataModule is built and its vocab_size read for model.vocab_size, which prepares the corpus (the
   one encoding into the cache, or a cache hit) and nothing more; then GPTModule, then the Trainer, whose
   callbacks are added and to which the batch plan is applied (instantiate_trainer).
2. fit, before training: the DataModule's prepare_data and setup, then every callback's setup (the contract checks),
   then GPTModule.setup (pretrained weights; the tokenizer taken from the DataModule, set up just before), then
   configure_model (torch.compile). A resumed run's checkpoint is loaded after that: GPTModule.on_load_checkpoint
   compares its tokenizer with the data's and checks the resume rules (resume.py), and the callbacks' states
   (TrainingMonitor's tokens_seen, the checkpoint callbacks') are restored before on_train_start.
   TrainingMonitor.on_fit_start checks the sample prompt against the tokenizer GPTModule.setup took.
3. Each micro-batch: callbacks' on_train_batch_start (FaultTolerance raises a stop decided at the last step) before
   GPTModule's (which puts back the RNG state taken when validation started); training_step (the NonFiniteGuard
   sees the loss); configure_gradient_clipping (sets grad_norm and shows the guard the step) before the optimizer
   step; then callbacks' on_train_batch_end (TrainingMonitor logs grad_norm of the step just taken; FaultTolerance
   reads the guard, votes on a signal and checkpoints; the checkpoint callbacks save) before GPTModule's (train/loss).
4. Validation: GPTModule.on_validation_start takes the RNG state before anything in validation draws from it;
   on_validation_epoch_end logs val/loss, which on_validation_end (TrainingMonitor's best loss and sample, the
   checkpoint callbacks' best.ckpt) reads.
5. Every save: callbacks' on_save_checkpoint (FaultTolerance refuses non-finite weights and a bad step) before
   GPTModule's (the tokenizer and every rank's RNG states go into the file).
"""
