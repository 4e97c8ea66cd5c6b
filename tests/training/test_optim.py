"""The optimizer and LR schedule (nanogpt/training/optim.py): AdamW as before, Muon beside it, warmup-stable-decay."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanogpt.errors import NanoGPTError
from nanogpt.training.fault import NonFiniteGuard, NonFiniteLossError
from nanogpt.model import GPT, GPTConfig
from nanogpt.training.optim import (
    MuonWithAdamW,
    OptimizerSettings,
    build_optimizer,
    build_schedule,
    parameter_roles,
    warmup_cosine,
    warmup_stable_decay,
)
from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_script

CONFIG = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _setup(model: GPT, s: OptimizerSettings, max_steps: int = 20):
    named = list(model.named_parameters())
    optimizer = build_optimizer(named, parameter_roles(model, s.optimizer), s, torch.device("cpu"))
    return optimizer, build_schedule(optimizer, s, max_steps)


def _train(model: GPT, optimizer, scheduler, steps: range) -> list[float]:
    losses = []
    for step in steps:
        _, loss = model(*_batch(step))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_cosine_schedule_keeps_its_numbers():
    f = partial(warmup_cosine, warmup_steps=100, decay_steps=2000, min_ratio=0.1)
    assert f(0) == 1 / 101 and f(99) == 100 / 101
    assert f(100) == 1.0 and f(1050) == pytest.approx(0.55) and f(2000) == f(5000) == 0.1


def test_warmup_stable_decay_is_flat_then_a_straight_line_down():
    f = partial(warmup_stable_decay, warmup_steps=100, decay_steps=1000, min_ratio=0.1, cooldown_fraction=0.2)
    assert f(0) == 1 / 101 and f(99) == 100 / 101
    assert f(100) == f(500) == f(800) == 1.0  # the cool-down is the last 200 steps
    assert f(900) == pytest.approx(0.55) and f(999) == pytest.approx(1 - 199 / 200 * 0.9)
    assert f(1000) == f(3000) == 0.1
    # a cool-down longer than the steps after warmup starts right after warmup
    g = partial(warmup_stable_decay, warmup_steps=10, decay_steps=100, min_ratio=0.0, cooldown_fraction=1.0)
    assert g(10) == 1.0 and g(55) == pytest.approx(0.5)


def test_the_default_is_todays_adamw_with_its_two_groups_and_cosine():
    model = _model()
    optimizer, scheduler = _setup(model, OptimizerSettings(learning_rate=2e-3, min_lr=2e-4, warmup_steps=5), 20)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2e-3 * warmup_cosine(s, warmup_steps=5, decay_steps=20, min_ratio=0.1) for s in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = _model()
    roles = parameter_roles(model, "muon")
    muon = {name for name, role in roles.items() if role == "muon"}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "decay"  # the head shares wte
    assert roles["transformer.h.0.ln_1.weight"] == roles["transformer.h.0.attn.c_attn.bias"] == "no_decay"
    s = OptimizerSettings(optimizer="muon", learning_rate=3e-3, min_lr=3e-4, muon_lr=0.05, warmup_steps=2,
                          muon_ns_steps=4)
    optimizer, scheduler = _setup(model, s, 10)
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    assert optimizer.muon.param_groups[0]["ns_steps"] == 4
    assert optimizer.param_groups == [*optimizer.adamw.param_groups, *optimizer.muon.param_groups]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, optimizer, scheduler, range(2))
    # the scheduler sets each group's own rate (warmup over, its peak), in the dicts the inner optimizers read
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.05)
    _train(model, optimizer, scheduler, range(2, 3))
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())  # every weight trains
    assert all(set(optimizer.state[p]) == {"momentum_buffer"} for p in optimizer.muon.param_groups[0]["params"])
    assert all("exp_avg_sq" in optimizer.state[p] for g in optimizer.adamw.param_groups for p in g["params"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_training_continues_bit_exactly_from_a_saved_optimizer_and_schedule(optimizer, schedule, tmp_path):
    s = OptimizerSettings(optimizer=optimizer, schedule=schedule, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2)
    straight = _model()
    opt, sched = _setup(straight, s)
    expected = _train(straight, opt, sched, range(12))

    first = _model()
    opt, sched = _setup(first, s)
    _train(first, opt, sched, range(6))
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "c")
    saved = torch.load(tmp_path / "c", weights_only=True)
    resumed = _model()  # fresh weights and optimizer, as after a restart
    resumed.load_state_dict(saved["model"])
    opt, sched = _setup(resumed, s)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert _train(resumed, opt, sched, range(6, 12)) == expected[6:]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    if optimizer == "muon":  # the state is still one dict, shared with the optimizers inside
        assert opt.state is opt.adamw.state is opt.muon.state and len(opt.state) == len(list(resumed.parameters()))


def test_muon_refuses_flattened_matrices():
    model = _model()
    roles = parameter_roles(model, "muon")
    # what FSDP hands the optimizer: each parameter flattened into a 1-D shard, under its original name
    flat = [(name, torch.nn.Parameter(p.detach().flatten())) for name, p in model.named_parameters()]
    with pytest.raises(NanoGPTError, match="muon needs whole 2-D weight matrices.*adamw with FSDP"):
        build_optimizer(flat, roles, OptimizerSettings(optimizer="muon"), torch.device("cpu"))
    build_optimizer(flat, parameter_roles(model, "adamw"), OptimizerSettings(), torch.device("cpu"))  # AdamW can
    # FSDP's FlatParameter (use_orig_params=False): one 1-D tensor under a name of its own
    one = [("_flat_param", torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()])))]
    with pytest.raises(NanoGPTError, match="_flat_param has shape"):
        build_optimizer(one, roles, OptimizerSettings(optimizer="muon"), torch.device("cpu"))
    adamw = build_optimizer(one, parameter_roles(model, "adamw"), OptimizerSettings(), torch.device("cpu"))
    assert [len(g["params"]) for g in adamw.param_groups] == [0, 1]  # no decay for it, as before


@pytest.mark.parametrize("on_device", [True, None], ids=["device-way", "host-floats"])
def test_the_guard_stops_a_muon_step_with_nan_gradients_before_it_updates(on_device):
    # Muon cannot skip a step on the device (no found_inf), so the guard checks the norm at once, either way
    model = _model()
    optimizer, _ = _setup(model, OptimizerSettings(optimizer="muon"))
    guard = NonFiniteGuard(skip_on_device=on_device)
    guard.see_loss(torch.tensor(1.0))
    guard.see_step(optimizer, torch.tensor(0.5), 0)  # a finite step passes
    guard.see_loss(torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match="at step 1;"):
        guard.see_step(optimizer, torch.tensor(float("nan")), 1)
    assert not hasattr(optimizer, "found_inf") and guard.bad_step(SimpleNamespace(world_size=1)) is None


def test_bad_optimizer_settings_are_one_line_errors(tmp_path):
    with pytest.raises(NanoGPTError, match="cooldown_fraction must be between 0 and 1"):
        OptimizerSettings(cooldown_fraction=1.5)
    with pytest.raises(NanoGPTError, match="muon_lr > 0"):
        OptimizerSettings(muon_lr=0.0)
    with pytest.raises(NanoGPTError, match="muon_ns_steps must be at least 1, got 0"):
        OptimizerSettings(muon_ns_steps=0)
    result = run_script("train.py", "--config", TINY_CONFIG, "--model.optimizer", "sgd",
                        "--trainer.default_root_dir", tmp_path / "run", cwd=tmp_path)
    assert_user_error(result, "optimizer")


# ---- real runs: exact resume, a changed optimizer on resume, DDP -------------------------------------------------

MUON = ["--model.optimizer", "muon", "--model.schedule", "wsd"]


@pytest.fixture(scope="module")
def muon_straight(tmp_path_factory, nanogpt_cache) -> Path:
    """An uninterrupted 60-step Muon run (test_resume's settings: dropout on, validations at 25 and 50)."""
    from tests.training.test_resume import train

    run = tmp_path_factory.mktemp("muon_straight") / "run"
    result = train(run, nanogpt_cache, *MUON)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_muon_run_stopped_and_resumed_is_bit_exact(muon_straight, nanogpt_cache, tmp_path):
    from tests.training.test_resume import MAX_STEPS, load, train

    run = tmp_path / "run"
    assert train(run, nanogpt_cache, *MUON, max_steps=35).returncode == 0
    second = train(run, nanogpt_cache, *MUON, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_scalars(muon_straight), read_scalars(run)
    assert [s for s, _ in b["train/loss"]] == list(range(MAX_STEPS))
    assert b["train/loss"] == a["train/loss"] and b["val/loss"] == a["val/loss"]
    assert b["train/lr"] == a["train/lr"]
    ca, cb = load(muon_straight / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    for name, tensor in ca["state_dict"].items():
        assert torch.equal(tensor, cb["state_dict"][name]), name
    sa, sb = ca["optimizer_states"][0], cb["optimizer_states"][0]
    assert len(sa["param_groups"]) == 3 and sa["param_groups"][2]["lr"] == sb["param_groups"][2]["lr"]
    momenta = [i for i, s in sa["state"].items() if "momentum_buffer" in s]
    assert len(momenta) == 8  # 2 blocks x 4 matrices
    for i, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)


@pytest.mark.slow
def test_resuming_with_another_optimizer_is_refused(muon_straight, nanogpt_cache, tmp_path):
    from tests.training.test_resume import train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((muon_straight / "checkpoints" / "last.ckpt").read_bytes())
    result = train(run, nanogpt_cache, "--model.schedule", "wsd", resume=True, max_steps=70)
    assert_user_error(result, "cannot change on resume", "optimizer: 'muon' -> 'adamw'")


@pytest.mark.slow
@pytest.mark.ddp
def test_muon_under_ddp_trains_like_one_process(tmp_path, nanogpt_cache):
    from tests.training.test_ddp import COMMON, TWO_PROCESSES

    env = {"NANOGPT_CACHE": str(nanogpt_cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"}
    runs = {}
    for name, extra in (("one", []), ("two", TWO_PROCESSES)):
        runs[name] = tmp_path / name
        result = run_script("train.py", *COMMON, *MUON, *extra, "--trainer.max_steps", "20",
                            "--trainer.default_root_dir", runs[name], cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_scalars(runs["one"]), read_scalars(runs["two"])
    assert [s for s, _ in two["train/loss"]] == list(range(20))
    # the same global batch, so the same gradients up to the order of the sums: the same training, to rounding
    # (Muon orthogonalizes in bfloat16, so the two runs part by more than AdamW's)
    assert two["train/loss"][0][1] == pytest.approx(one["train/loss"][0][1], abs=1e-5)
    for (s2, v2), (s1, v1) in zip(two["train/loss"], one["train/loss"]):
        assert s1 == s2 and v2 == pytest.approx(v1, abs=2e-2)
    assert two["val/loss"][-1][1] == pytest.approx(one["val/loss"][-1][1], abs=2e-2)
    assert math.isfinite(two["val/loss"][-1][1]) and two["val/loss"][-1][1] < two["val/loss"][0][1]
    state = torch.load(runs["two"] / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    assert sum("momentum_buffer" in s for s in state["state"].values()) == 8
