"""The speed path on CPU: device-gathered batches equal host ones, logging and reads only on logging steps, no
recompiles, gradients freed after each update."""

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanogpt.data.datamodule import TextDataModule
from nanogpt.data.blocks import sample_rank_batch, tokens_fit_on_device, tokens_to_device
from nanogpt.training.fault import NonFiniteGuard
from nanogpt.training.module import GPTModule
from nanogpt.training.loggers import RunTensorBoardLogger
from nanogpt.training.metrics import TrainingMonitor
from tests.conftest import TINY_CONFIG, read_scalars


@pytest.mark.parametrize("dtype, vocab", [(np.uint8, 65), (np.uint16, 1000)])
def test_batches_gathered_from_a_device_tensor_equal_host_batches(dtype, vocab):
    tokens = (np.arange(5000) * 7 % vocab).astype(dtype)
    on_device = tokens_to_device(tokens, torch.device("cpu"))  # the code path a GPU runs, on the CPU
    assert on_device.dtype == (torch.uint8 if dtype == np.uint8 else torch.int32)
    for step in (0, 1, 17):
        hx, hy = sample_rank_batch(tokens, 32, 8, seed=5, rank=0, micro_step=step)
        dx, dy = sample_rank_batch(on_device, 32, 8, seed=5, rank=0, micro_step=step)
        assert dx.dtype == torch.int64 and dx.shape == (8, 32)
        assert torch.equal(hx, dx) and torch.equal(hy, dy)
        hx, hy = sample_rank_batch(tokens, 32, 4, seed=5, rank=1, micro_step=step, world_size=2, accumulation=2)
        dx, dy = sample_rank_batch(on_device, 32, 4, seed=5, rank=1, micro_step=step, world_size=2, accumulation=2)
        assert torch.equal(hx, dx) and torch.equal(hy, dy)


def test_corpus_stays_on_the_host_for_a_cpu_run():
    assert not tokens_fit_on_device(10, torch.device("cpu"))


@pytest.mark.parametrize("on_device", [None, True])
def test_datamodule_serves_the_same_batches_from_either_placement(tmp_path, shakespeare_text, on_device):
    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=32, batch_size=4, seed=3, cache_dir=str(tmp_path / "c"),
                        tokens_on_device=on_device)
    loader = dm.train_dataloader()
    assert loader.pin_memory is False  # pinning is for host batches bound for a GPU
    assert isinstance(dm._train_tokens_for(torch.device("cpu")), torch.Tensor) == bool(on_device)
    batches = [b for _, b in zip(range(3), loader)]
    for step, (x, y) in enumerate(batches):
        ex, ey = sample_rank_batch(dm.train_tokens, 32, 4, seed=3, rank=0, micro_step=step)
        assert torch.equal(x, ex) and torch.equal(y, ey)


def _small_data(tmp_path, text, **kwargs) -> TextDataModule:
    """A data module over 20,000 characters of Shakespeare: blocks of 16, batches of 4, 4 validation blocks."""
    f = tmp_path / "corpus.txt"
    f.write_text(text[:20000], encoding="utf-8")
    return TextDataModule(**{"source": str(f), "block_size": 16, "batch_size": 4, "val_blocks": 4,
                             "cache_dir": str(tmp_path / "c"), **kwargs})


def test_training_scalars_are_logged_on_logging_steps_only(tmp_path, shakespeare_text):
    dm = _small_data(tmp_path, shakespeare_text)
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=25, log_every_n_steps=10, limit_val_batches=0, enable_progress_bar=True,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
        logger=RunTensorBoardLogger(str(tmp_path)), callbacks=[TrainingMonitor()],
    )
    trainer.fit(model, datamodule=dm)
    # the module's and the monitor's scalars, at the 10th and 20th steps only (logged at the index of the step)
    tags = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen"}
    scalars = read_scalars(tmp_path)
    for tag in tags:
        assert [s for s, _ in scalars[tag]] == [9, 19], tag
    assert 2.0 < scalars["train/loss"][-1][1] < 4.5
    assert scalars["train/tokens_seen"][-1][1] == 20 * 4 * 16
    # callbacks (and StepProgressBar) see them as they see any self.log value
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(scalars["train/loss"][-1][1], rel=1e-6)
    assert tags <= set(trainer.callback_metrics)


def test_train_loss_is_the_mean_over_the_micro_batches_of_a_step(tmp_path, shakespeare_text):
    # 4 sequences a step in 2 micro-batches: train/loss is the loss of the global batch, not of its last half
    dm = _small_data(tmp_path, shakespeare_text, micro_batch_size=2)

    class Recording(GPTModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen.append(float(loss))
            return loss

    model = Recording(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    model.seen = []
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, log_every_n_steps=2, limit_val_batches=0, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
        logger=RunTensorBoardLogger(str(tmp_path)),
    )
    trainer.fit(model, datamodule=dm)
    logged = read_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in logged] == [1, 3]
    for (_, value), first in zip(logged, (2, 6)):  # micro-batches 2, 3 make step 1; 6, 7 step 3
        assert value == pytest.approx((model.seen[first] + model.seen[first + 1]) / 2, rel=1e-5)


class _CountGraphs(L.Callback):
    """Notes how many graphs torch.compile has built at the end of each validation."""

    def __init__(self):
        self.after_validation = []

    def on_validation_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        self.after_validation.append(counters["stats"]["unique_graphs"])


def test_compiled_model_never_recompiles_after_the_first_validation(tmp_path, shakespeare_text, monkeypatch):
    # the compile path of a GPU run, on the CPU: dynamo's graph capture and guards are what decide recompiles,
    # so the "eager" backend (no code generation, seconds instead of minutes) is enough to count them
    import torch._dynamo

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager", **kw))
    torch._dynamo.reset()
    # 10 validation blocks in batches of 4: the last batch is smaller (4, 4, 2)
    dm = _small_data(tmp_path, shakespeare_text, val_blocks=10)
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1,
                      compile=True)
    graphs = _CountGraphs()
    # as in a real run, the monitor writes a text sample after every validation (to TensorBoard); it is generated
    # one token at a time, a new input shape each, and must not compile a graph for each of them
    monitor = TrainingMonitor(sample_tokens=24)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=15, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        logger=RunTensorBoardLogger(str(tmp_path)), default_root_dir=tmp_path,
        callbacks=[monitor, graphs],  # graphs counts after the monitor's sample
    )
    trainer.fit(model, datamodule=dm)
    assert len(graphs.after_validation) == 3
    # training, evaluation, and evaluation of the smaller last batch; nothing for the samples
    assert graphs.after_validation == [3, 3, 3]
    samples = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload().Tensors("val/sample")
    assert len(samples) == 3 and all(len(e.tensor_proto.string_val[0]) > 24 for e in samples)
    torch._dynamo.reset()


class _CountReads(L.Callback):
    """Counts, per training step, the calls that read a tensor's value on the host: on a GPU each one is a sync.

    On a CPU nothing waits, but the calls are the same as on a GPU, so counting them is the CPU twin of checking
    that a GPU step never waits for the device.
    """

    READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.per_step = {}
        self._step = None
        for name in self.READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self._step is not None:
                    self.per_step[self._step] = self.per_step.get(self._step, 0) + 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.per_step.setdefault(self._step, 0)

    # a step's window runs to the next step's start: its batch-end hooks (the module's, the checkpoint callback's)
    # run after this callback's, and the next batch is fetched in between
    def on_train_end(self, trainer, pl_module):
        self._step = None


@pytest.mark.parametrize("guard_on_device", [True, False], ids=["gpu-guard", "cpu-guard"])
def test_a_training_step_reads_nothing_back_from_the_device_except_on_logging_steps(tmp_path, monkeypatch,
                                                                                   guard_on_device):
    # the real training path (train.py's CLI: monitor, fault tolerance, checkpoints, progress bar); no validation
    # in the window, logging every 5 steps. gpu-guard: the non-finite guard as a GPU runs it (the fused AdamW skips a
    # bad step on the device); cpu-guard: a CPU's default, which reads the loss and the gradient norm as floats at
    # once (nothing to wait for there, and cheaper than the device ops)
    from nanogpt.training.cli import GPTLightningCLI

    cli = GPTLightningCLI([
        "--config", str(TINY_CONFIG), "--trainer.max_steps", "20", "--trainer.val_check_interval", "1000",
        "--trainer.log_every_n_steps", "5", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "true",
    ])
    if guard_on_device:
        cli.model.nonfinite = NonFiniteGuard(skip_on_device=True)
    reads = _CountReads(monkeypatch)
    cli.trainer.callbacks.append(reads)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logging = {4, 9, 14, 19}  # the steps whose scalars are written (and whose non-finite flags are read)
    assert set(reads.per_step) == set(range(20))
    quiet = {s: n for s, n in reads.per_step.items() if s not in logging}
    assert set(quiet.values()) == ({0} if guard_on_device else {2}), str(reads.per_step)  # cpu-guard: loss, norm
    assert all(reads.per_step[s] > max(quiet.values()) for s in logging)  # the counter works: logging steps read


class _GradsAt(L.Callback):
    """Notes, at each hook, whether any parameter holds a gradient."""

    def __init__(self):
        self.seen = []  # (hook, optimizer steps done, micro-batch index, any gradient held)

    def _note(self, hook, trainer, pl_module, batch_idx):
        held = any(p.grad is not None for p in pl_module.parameters())
        self.seen.append((hook, trainer.global_step, batch_idx, held))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note("start", trainer, pl_module, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._note("before_step", trainer, pl_module, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._note("end", trainer, pl_module, batch_idx)


def test_gradients_are_freed_right_after_each_update_and_accumulate_between(tmp_path, shakespeare_text):
    # nanoGPT's order: no gradient is held during a step's forward pass (Lightning would zero them only after it);
    # with 2 micro-batches a step, the first one's gradients are kept for the second's
    dm = _small_data(tmp_path, shakespeare_text, micro_batch_size=2)
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    grads = _GradsAt()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, log_every_n_steps=1, limit_val_batches=0, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path,
        callbacks=[grads],
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.accumulate_grad_batches == 2
    expected = []
    for step in range(3):
        first, second = 2 * step, 2 * step + 1
        expected += [("start", step, first, False), ("end", step, first, True),  # kept for the next micro-batch
                     ("start", step, second, True), ("before_step", step, None, True),
                     ("end", step + 1, second, False)]  # freed by the update
    assert grads.seen == expected
