"""fp16 mixed precision end to end, on the CPU: the path V100s and T4s train on (autocast to float16, a GradScaler).

On a CPU Lightning would swap 16-mixed for bf16; the CLI keeps fp16 (nanogpt/training/precision.py), so these runs
take the GPU's fp16 path: loss scaling, steps the scaler skips on an overflow, its state in the checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.evaluate import main as evaluate_main
from tests.conftest import TINY_CONFIG, read_scalars, run_main, run_script, run_train
from tests.training.test_metrics import _samples

pytestmark = pytest.mark.slow  # real training runs

STEPS, INF_AT = 20, 3
ARGS = [
    "--config", TINY_CONFIG,
    "--trainer.precision", "16-mixed",
    "--trainer.val_check_interval", 10,
    "--trainer.log_every_n_steps", 1,
    "--data.val_blocks", 16,
    "--data.batch_size", 8,  # fp16 steps cost a CPU about 3x fp32 ones: half the batch keeps the runs short
    "--monitor.sample_tokens", 20,
]
INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's


class InfGradient(Callback):
    """Test helper loaded by train.py through --config: one gradient becomes inf after the backward of one step,
    as an fp16 overflow leaves it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.fill_(float("inf"))


def _args(run: Path, tmp: Path, max_steps: int) -> list:
    overflow = tmp / "overflow.yaml"
    overflow.write_text("trainer:\n  callbacks:\n    - class_path: tests.training.test_fp16.InfGradient\n"
                        f"      init_args: {{step: {INF_AT}}}\n", encoding="utf-8")
    return [*ARGS, "--config", overflow, "--trainer.max_steps", max_steps, "--trainer.default_root_dir", run]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, nanogpt_cache):
    """An uninterrupted fp16 run of STEPS steps with an overflow injected at step INF_AT, as a user runs it."""
    tmp = tmp_path_factory.mktemp("fp16")
    run = tmp / "run"
    result = run_script("train.py", *_args(run, tmp, STEPS), "--quiet", cwd=tmp,
                        env={"NANOGPT_CACHE": str(nanogpt_cache)})
    return run, result


def test_an_overflow_is_skipped_by_the_scaler_not_stopped(straight):
    run, result = straight
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: 16-mixed (set by --trainer.precision" in result.stderr  # the run says what it trains in
    assert "bf16" not in result.stdout + result.stderr.replace("default is", "")  # Lightning did not swap it
    ckpt = load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS  # trained to the end: no NaN stop, no rollback to an earlier step
    scaler = ckpt["MixedPrecision"]  # the GradScaler's state, saved with the run
    skipped = round(math.log2(INITIAL_SCALE / scaler["scale"]))  # each skip halves the scale (no growth in 20 steps)
    assert skipped >= 1  # the injected overflow at least
    # the skipped steps never reached the weights: AdamW counted only the steps it took
    assert {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {STEPS - skipped}
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    scalars = read_scalars(run)
    grad_norm = dict(scalars["train/grad_norm"])
    assert math.isinf(grad_norm[INF_AT])  # the overflow, seen (the unscaled norm) and left to the scaler
    # the gradient norm is the true one, not times the loss scale (65536): fused AdamW unscales in its step, so
    # the gradients are unscaled before clipping
    assert all(v < 100 for s, v in grad_norm.items() if s != INF_AT and math.isfinite(v))
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == list(range(STEPS))  # every step once: nothing rolled back and replayed
    losses = [v for _, v in scalars["train/loss"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]  # it learns through the overflow


def test_validation_and_the_text_sample_run_in_fp16(straight):
    run, result = straight
    assert result.returncode == 0, result.stderr[-3000:]
    val = read_scalars(run)["val/loss"]
    assert [s for s, _ in val] == [9, 19] and all(math.isfinite(v) for _, v in val) and val[1][1] < val[0][1]
    samples = _samples(run)
    assert sorted(samples) == [9, 19] and all(len(text) > 20 for text in samples.values())


def test_eval_in_fp16_gives_the_runs_fp16_val_loss(straight, capsys):
    run, result = straight
    assert result.returncode == 0, result.stderr[-3000:]
    logged = read_scalars(run)["val/loss"][-1][1]
    figures = {}
    for precision in ("16-mixed", "32-true"):
        out = run_main(evaluate_main, capsys, "--ckpt", run / "checkpoints" / "last.ckpt", "--split", "val",
                       "--precision", precision)
        assert out.returncode == 0, out.stderr[-3000:]
        figures[precision] = float(out.stdout.strip().splitlines()[-1].split('"loss": ')[1].split(",")[0])
    # the same blocks through the same fp16 autocast as the run's validation; full precision lands near, not on it
    assert figures["16-mixed"] == pytest.approx(logged, abs=1e-5)
    assert figures["32-true"] == pytest.approx(logged, abs=2e-2)


def test_a_resumed_fp16_run_continues_bit_exactly(straight, tmp_path, nanogpt_cache):
    reference, result = straight
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert run_train(None, *_args(run, tmp_path, STEPS // 2)).returncode == 0  # stops after the overflow
    half = load(run / "checkpoints" / "last.ckpt")["MixedPrecision"]
    assert half["scale"] < INITIAL_SCALE  # the checkpoint carries the lowered scale...
    assert run_train(None, *_args(run, tmp_path, STEPS), "--ckpt_path", "last").returncode == 0
    a, b = read_scalars(reference), read_scalars(run)
    assert [s for s, _ in b["train/loss"]] == list(range(STEPS))
    assert b["train/loss"] == a["train/loss"] and b["val/loss"] == a["val/loss"]
    ca, cb = load(reference / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert cb["MixedPrecision"] == ca["MixedPrecision"]  # ...and its growth count, restored on resume
    for name, tensor in ca["state_dict"].items():
        assert torch.equal(tensor, cb["state_dict"][name]), name
