"""The learning-rate schedule as a run logs it (train/lr in TensorBoard): linear warmup, cosine to min_lr at
decay_steps, flat after; and on resume with decay_steps unset, the cosine re-stretched to the new max_steps."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, read_scalars, run_train

pytestmark = pytest.mark.slow  # three training runs (in this process) of 30 to 60 steps

LR, MIN_LR, WARMUP, STEPS = 3e-3, 3e-4, 5, 30


def expected_lr(step: int, decay_steps: int) -> float:
    """README's schedule, written out: warmup to LR over WARMUP steps, cosine down to MIN_LR at decay_steps."""
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    if step >= decay_steps:
        return MIN_LR
    progress = (step - WARMUP) / (decay_steps - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def _train(run: Path, data: tuple[Path, Path], max_steps: int, *extra) -> list[tuple[int, float]]:
    result = run_train(
        None, "--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--trainer.max_steps", max_steps,
        "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "1000", "--model.warmup_steps", WARMUP,
        "--data.source", data[0], "--data.cache_dir", data[1], "--quiet", *extra,
    )
    assert result.returncode == 0
    return read_scalars(run)["train/lr"]


@pytest.fixture(scope="module")
def first(tmp_path_factory, shakespeare_path) -> tuple[Path, tuple[Path, Path]]:
    """A 30-step run with decay_steps unset (so the cosine ends at max_steps): (run dir, (corpus, data cache))."""
    work = tmp_path_factory.mktemp("schedule")
    data = (shakespeare_path, work / "cache")
    _train(work / "run", data, STEPS)
    return work / "run", data


def _resumed(first: tuple, tmp_path: Path, max_steps: int, *extra) -> list[tuple[int, float]]:
    run = tmp_path / "run"
    shutil.copytree(first[0], run)
    return _train(run, first[1], max_steps, "--ckpt_path", "last", *extra)


def test_warmup_then_cosine_to_max_steps(first):
    lr = read_scalars(first[0])["train/lr"]
    assert [s for s, _ in lr] == list(range(STEPS))
    for step, value in lr:
        assert value == pytest.approx(expected_lr(step, STEPS), rel=1e-6), step
    assert max(lr, key=lambda sv: sv[1]) == (WARMUP, pytest.approx(LR, rel=1e-6))  # the peak, where warmup ends
    assert lr[-1][1] == pytest.approx(MIN_LR, rel=0.05)  # the last step is nearly at min_lr


def test_cosine_reaches_min_lr_at_decay_steps_and_stays(first, tmp_path):
    # resumed with decay_steps set to where the first run's cosine ended: the schedule is kept, flat at min_lr
    lr = _resumed(first, tmp_path, STEPS + 10, "--model.decay_steps", STEPS)
    after = [(s, v) for s, v in lr if s >= STEPS]
    assert [s for s, _ in after] == list(range(STEPS, STEPS + 10))
    assert all(v == pytest.approx(MIN_LR, rel=1e-6) for _, v in after), after
    assert lr[STEPS - 1][1] > MIN_LR  # not there before decay_steps


def test_resume_with_more_steps_restretches_the_cosine(first, tmp_path):
    # decay_steps unset: the cosine now ends at the new max_steps, so the resumed steps follow that curve
    lr = _resumed(first, tmp_path, 2 * STEPS)
    assert [s for s, _ in lr] == list(range(2 * STEPS))
    for step, value in lr[STEPS:]:
        assert value == pytest.approx(expected_lr(step, 2 * STEPS), rel=1e-6), step
    assert lr[STEPS][1] > 2 * MIN_LR  # back up from the first run's end, half way along the new cosine
    assert lr[-1][1] == pytest.approx(MIN_LR, rel=0.05)
