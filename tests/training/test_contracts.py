"""Contracts between the training layer's parts: settings named once, callbacks that check their module, one batch
plan, and a CLI that prepares the corpus once (see nanogpt/training/__init__.py)."""

import inspect
from dataclasses import fields

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

import nanogpt.data
import nanogpt.data.datamodule as datamodule
from nanogpt.data.batch_plan import BatchPlan
from nanogpt.data.datamodule import TextDataModule
from nanogpt.hf.export import MAPPED_FIELDS
from nanogpt.hf.pretrained import PRETRAINED_FIELDS
from nanogpt.model import GPTConfig
from nanogpt.training.cli import GPTLightningCLI
from nanogpt.training.fault import FaultTolerance
from nanogpt.training.metrics import TrainingMonitor
from nanogpt.training.module import GPTModule
from nanogpt.training.optim import OptimizerSettings
from nanogpt.training.resume import RESTORED_FIELDS, SHAPE_FIELDS
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def test_field_lists_are_read_off_the_dataclasses():
    assert SHAPE_FIELDS == ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "activation")
    assert set(RESTORED_FIELDS) == {"learning_rate", "weight_decay", "beta1", "beta2", "optimizer", "muon_lr",
                                    "muon_momentum", "muon_weight_decay", "muon_ns_steps"}
    assert set(PRETRAINED_FIELDS) == {"n_layer", "n_head", "n_embd", "activation", "bias"}
    assert MAPPED_FIELDS == tuple(f.name for f in fields(GPTConfig))


def test_gpt_module_takes_its_defaults_from_the_dataclasses():
    params = dict(inspect.signature(GPTModule.__init__).parameters)
    del params["self"]
    own = {"compile": False, "init_from": None}  # the only arguments that are GPTModule's alone
    settings = {f.name: f.default for cls in (GPTConfig, OptimizerSettings) for f in fields(cls)}
    assert set(params) == set(settings) | set(own)
    assert {name: p.default for name, p in params.items()} == {**settings, **own}
    module = GPTModule(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8, muon_lr=0.05)
    assert module.config == GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8)
    assert module.optim_settings == OptimizerSettings(muon_lr=0.05)
    assert set(module.hparams) == set(params)  # what checkpoints store: every argument, as before


@pytest.mark.parametrize("callback, says", [(FaultTolerance(), "NonFiniteGuard"), (TrainingMonitor(), "tokenizer")])
def test_a_callback_refuses_a_module_that_is_not_a_gpt_module(tmp_path, callback, says):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=rf"{type(callback).__name__} reads .*{says}.* but the Trainer runs a "
                                        r"BoringModel; train a GPTModule"):
        trainer.fit(BoringModel())
    assert trainer.global_step == 0  # refused in setup, before any step


def test_the_old_datamodule_name_still_imports():
    assert nanogpt.data.CharDataModule is TextDataModule is nanogpt.data.TextDataModule
    assert datamodule.CharDataModule is TextDataModule


def test_the_batch_plan_is_applied_once_per_trainer(tmp_path, shakespeare_text):
    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=32, batch_size=12, micro_batch_size=3, val_blocks=10,
                        cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, val_check_interval=5)
    plan = dm.apply_batch_plan(trainer)
    dm.trainer = trainer
    dm.setup("fit")  # the plan is applied already: setup leaves the trainer as it is
    assert dm.apply_batch_plan(trainer) is plan == BatchPlan(12, 3, 4, 1)
    # validation every 5 optimizer steps = 20 micro-batches, counted once
    assert (trainer.accumulate_grad_batches, trainer.val_check_interval) == (4, 20)


def _counting(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.slow
def test_the_cli_prepares_the_corpus_once_and_leaves_setup_to_fit(tmp_path, shakespeare_text, monkeypatch):
    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:30000], encoding="utf-8")
    encodings = _counting(monkeypatch, datamodule, "prepare_corpus")
    setups = _counting(monkeypatch, TextDataModule, "setup")
    cli = GPTLightningCLI(["--config", str(TINY_CONFIG), "--data.source", str(f), "--data.cache_dir",
                           str(tmp_path / "cache"), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                           "--data.val_blocks", "4", "--monitor.sample_tokens", "0",
                           "--trainer.default_root_dir", str(tmp_path / "run")])
    # the vocabulary sized the model: the corpus was encoded once, and nothing was set up for training yet
    assert cli.model.config.vocab_size == cli.datamodule.tokenizer.vocab_size
    assert (len(encodings), len(setups)) == (1, 0)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert len(encodings) == 1 and setups  # fit set the data up, on the corpus prepared already
