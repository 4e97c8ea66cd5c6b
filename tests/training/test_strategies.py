"""Global-batch arithmetic, per-rank data, and the DDP and FSDP strategies the CLI builds (no processes launched)."""

import math

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

from nanogpt.training.cli import GPTLightningCLI
from nanogpt.data.datamodule import TextDataModule
from nanogpt.data.blocks import sample_rank_batch
from nanogpt.data.batch_plan import BatchPlan, plan_batch
from nanogpt.training.strategies import DDP_DEFAULTS, GPTFSDPStrategy
from nanogpt.errors import NanoGPTError
from nanogpt.private import ddp_kwargs
from nanogpt.model import GPT, Block, GPTConfig
from nanogpt.training.module import GPTModule
from tests.conftest import REPO, TINY_CONFIG

# LightningCLI warns that pytest's own argv is there too: it reads only the args it is given
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
FSDP_CONFIG = REPO / "configs" / "gpt2_xl_char_fsdp.yaml"


@pytest.mark.parametrize(
    "args, plan",
    [
        ((64, 1), BatchPlan(64, 64, 1, 1)),
        ((64, 8), BatchPlan(64, 8, 1, 8)),
        ((64, 2, 8), BatchPlan(64, 8, 4, 2)),  # micro-batch given: accumulation follows
        ((64, 8, 4), BatchPlan(64, 4, 2, 8)),
        ((64, 2, None, 4), BatchPlan(64, 8, 4, 2)),  # accumulation given (trainer.accumulate_grad_batches)
        ((64, 2, 8, 4), BatchPlan(64, 8, 4, 2)),  # both given and consistent
    ],
)
def test_global_batch_splits_into_micro_batches_and_accumulation(args, plan):
    got = plan_batch(*args)
    assert got == plan
    assert got.micro_batch * got.world_size * got.accumulation == got.global_batch


@pytest.mark.parametrize(
    "args, fragments",
    [
        ((16, 3), ["data.batch_size 16", "3 device(s)", "multiple of 3", "15 or 18"]),
        ((16, 2, 5), ["data.micro_batch_size 5", "= 10", "[1, 2, 4, 8]"]),
        ((16, 2, None, 3), ["2 device(s) x 3 accumulation steps", "multiple of 6"]),
        ((16, 2, 4, 4), ["accumulate_grad_batches 4 disagrees", "= 2"]),
        ((0, 1), ["positive"]),
        ((16, 1, 0), ["micro_batch_size must be a positive"]),
    ],
)
def test_a_batch_that_does_not_divide_is_a_clear_error(args, fragments):
    with pytest.raises(NanoGPTError) as e:
        plan_batch(*args)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_ranks_take_disjoint_shares_of_the_same_global_batch():
    tokens = (np.arange(50_000) % 251).astype(np.int64)
    one, _ = sample_rank_batch(tokens, 16, 8, seed=3, rank=0, micro_step=5)  # 1 device: the whole batch
    r0, y0 = sample_rank_batch(tokens, 16, 4, seed=3, rank=0, micro_step=5, world_size=2)
    r1, _ = sample_rank_batch(tokens, 16, 4, seed=3, rank=1, micro_step=5, world_size=2)
    assert r0.shape == (4, 16) and torch.equal(r0[:, 1:], y0[:, :-1])
    assert not torch.equal(r0, r1)  # the two ranks' batches at a step differ...
    assert torch.equal(torch.cat([r0, r1]), one)  # ...and together they are the 1-device batch
    # 1 device with 2 accumulation micro-steps of 4: the same 8 sequences for optimizer step 5
    a0, _ = sample_rank_batch(tokens, 16, 4, seed=3, rank=0, micro_step=10, accumulation=2)
    a1, _ = sample_rank_batch(tokens, 16, 4, seed=3, rank=0, micro_step=11, accumulation=2)
    assert torch.equal(torch.cat([a0, a1]), one)
    # 2 devices x 2 micro-steps of 2
    parts = [sample_rank_batch(tokens, 16, 2, seed=3, rank=r, micro_step=10 + i, world_size=2, accumulation=2)[0]
             for i in range(2) for r in range(2)]
    assert torch.equal(torch.cat(parts), one)
    other_step, _ = sample_rank_batch(tokens, 16, 8, seed=3, rank=0, micro_step=6)
    assert not torch.equal(other_step, one)
    with pytest.raises(ValueError):
        sample_rank_batch(tokens, 16, 4, seed=3, rank=2, micro_step=0, world_size=2)


def _cli(*args):
    return GPTLightningCLI(["--config", str(TINY_CONFIG), *map(str, args)])


def test_ddp_gets_the_free_settings_and_the_batch_plan(tmp_path):
    cli = _cli("--trainer.devices", 2, "--trainer.strategy", "ddp", "--data.micro_batch_size", 4,
               "--trainer.default_root_dir", tmp_path / "run")
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DDPStrategy) and cli.trainer.world_size == 2
    for key, value in DDP_DEFAULTS.items():
        assert ddp_kwargs(strategy)[key] == value
    assert DDP_DEFAULTS == {"find_unused_parameters": False, "gradient_as_bucket_view": True}
    # global batch 16 = 4 per device x 2 devices x 2 micro-steps; validation every 100 optimizer steps
    assert cli.trainer.accumulate_grad_batches == 2
    assert cli.trainer.val_check_interval == 200


def test_a_users_own_ddp_kwargs_win(tmp_path):
    strategy = ('{"class_path": "lightning.pytorch.strategies.DDPStrategy", '
                '"init_args": {"find_unused_parameters": true, "static_graph": true}}')
    cli = _cli("--trainer.devices", 2, "--trainer.strategy", strategy, "--trainer.default_root_dir", tmp_path / "run")
    kwargs = ddp_kwargs(cli.trainer.strategy)
    assert kwargs["static_graph"] is True
    assert kwargs["find_unused_parameters"] is True
    assert kwargs["gradient_as_bucket_view"] is True


def test_datamodule_applies_the_plan_to_its_trainer(tmp_path, shakespeare_text):
    import lightning as L

    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=32, batch_size=12, micro_batch_size=3, val_blocks=10,
                        cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.batch_plan == BatchPlan(12, 3, 4, 1) and trainer.accumulate_grad_batches == 4
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 32)
    assert [len(b[0]) for b in dm.val_dataloader()] == [3, 3, 3, 1]  # validation runs in micro-batches too


def _decay_groups(module):
    import lightning as L

    module.trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False)
    groups = module.configure_optimizers()["optimizer"].param_groups
    return [(g["weight_decay"], sum(p.numel() for p in g["params"])) for g in groups]


def test_weight_decay_groups_survive_fsdp_flattening_and_wrapper_names():
    # under FSDP, configure_optimizers sees each Block inside wrappers (FSDP, activation checkpointing) and its
    # parameters as 1-D shards: the groups must still be the plain model's, matrices and embeddings decayed
    kw = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, weight_decay=0.1)
    plain, wrapped = GPTModule(**kw), GPTModule(**kw)
    blocks = wrapped.model.transformer.h
    for i, block in enumerate(list(blocks)):
        inner, outer = torch.nn.Module(), torch.nn.Module()
        inner.add_module("_checkpoint_wrapped_module", block)
        outer.add_module("_fsdp_wrapped_module", inner)
        blocks[i] = outer
    for p in wrapped.parameters():
        p.data = p.data.reshape(-1)  # what FSDP's use_orig_params views look like outside forward
    matrices = sum(p.numel() for p in plain.model.parameters() if p.dim() >= 2)
    vectors = sum(p.numel() for p in plain.model.parameters() if p.dim() < 2)
    assert _decay_groups(plain) == [(0.1, matrices), (0.0, vectors)]
    assert _decay_groups(wrapped) == [(0.1, matrices), (0.0, vectors)]


def test_fsdp_config_wraps_each_block_and_is_gpt2_xl_sized():
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    strategy_cfg = config["trainer"]["strategy"]
    assert strategy_cfg["class_path"] == "nanogpt.distributed.GPTFSDPStrategy"
    strategy = GPTFSDPStrategy(**strategy_cfg["init_args"])
    wrap = strategy.kwargs["auto_wrap_policy"]  # FSDP asks the policy of every module: a Block is a unit
    block = Block(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert wrap(module=block, recurse=False, nonwrapped_numel=0)
    assert not wrap(module=block.mlp, recurse=False, nonwrapped_numel=0)
    assert strategy.activation_checkpointing is True
    assert GPTFSDPStrategy().activation_checkpointing is False  # off unless asked for
    model_cfg = GPTConfig.from_dict(config["model"])
    with torch.device("meta"):  # shapes only: 1.5B parameters would take 6 GB
        n = GPT(model_cfg).num_params()
    assert 1.4e9 < n < 1.6e9, n
    plan = plan_batch(config["data"]["batch_size"], 8, config["data"]["micro_batch_size"])
    assert plan == BatchPlan(64, 4, 2, 8)
    assert math.isclose(plan.global_batch * model_cfg.block_size, 65536)


def test_fsdp_on_cpu_is_a_clear_error(tmp_path):
    # PyTorch's FSDP needs an accelerator; the config itself parses and builds up to the Trainer
    with pytest.raises(NanoGPTError, match="FSDP needs GPUs"):
        GPTLightningCLI(["--config", str(FSDP_CONFIG), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                         "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "64",
                         "--model.block_size", "32", "--trainer.default_root_dir", str(tmp_path / "run")])


def test_a_global_batch_that_does_not_divide_is_refused_before_any_process_starts(tmp_path):
    with pytest.raises(NanoGPTError, match="data.batch_size 15 .* over 2 device"):
        _cli("--trainer.devices", 2, "--trainer.strategy", "ddp", "--data.batch_size", 15,
             "--trainer.default_root_dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_strategy_name_is_a_clear_error(tmp_path):
    with pytest.raises(NanoGPTError, match="bad trainer settings: .*invalid strategy name"):
        _cli("--trainer.strategy", "nanogpt.distributed.GPTFSDPStrategy", "--trainer.default_root_dir", tmp_path / "r")


@pytest.fixture
def gloo_world():
    """A real 1-process gloo world (an in-memory store), torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_stop_vote_answers_one_step_late_on_its_own_gloo_group(gloo_world):
    import lightning as L

    from nanogpt.training.fault import StopVote

    vote = StopVote(L.Trainer(accelerator="cpu", devices=1, logger=False))
    assert gloo_world.get_backend(vote.group) == "gloo" and vote.group != gloo_world.GroupMember.WORLD
    assert vote.any_rank(False) is False  # starts the first vote; nothing to read yet
    assert vote.any_rank(True) is False  # reads the first (no), starts one with this rank's yes
    assert vote.any_rank(False) is True  # the yes of a step ago: every rank reads it at this same step
    assert vote._work is None  # decided: no vote left in flight
    vote.any_rank(False)  # a vote in flight at the end ...
    vote.close()  # ... is waited for, and the group goes
    assert vote.group is None and vote._work is None


def test_without_a_gloo_group_the_stop_vote_asks_the_strategy_at_once(gloo_world, monkeypatch):
    import lightning as L

    from nanogpt.training.fault import StopVote

    def no_gloo(*args, **kwargs):
        raise RuntimeError("Distributed package doesn't have Gloo built in")

    monkeypatch.setattr(gloo_world, "new_group", no_gloo)
    vote = StopVote(L.Trainer(accelerator="cpu", devices=1, logger=False))
    assert vote.group is None
    assert vote.any_rank(False) is False and vote.any_rank(True) is True  # the strategy's blocking answer, no lag
    vote.close()
