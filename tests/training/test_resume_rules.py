"""What may and may not change on resume (README "Resume"), on real LightningCLI runs of the tiny config.

The runs are train.py's main() in this process (tests/conftest.py run_train): a few steps each, no interpreter
start-up, so the refusals (which train nothing past one 6-step base run) are train.py's one-line errors in
`pytest -m "not slow"`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_train

BASE_STEPS = 6


def _args(run: Path, data: tuple[Path, Path], *extra) -> list:
    # every step logged, dropout on, no validation in these few steps; data = (corpus file, its cache), no download
    return ["--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--trainer.log_every_n_steps", "1",
            "--model.dropout", "0.1", "--data.source", data[0], "--data.cache_dir", data[1], "--quiet", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory, shakespeare_path) -> tuple[Path, tuple[Path, Path]]:
    """A 6-step run: (run dir, (corpus, data cache)); the checkpoint every test here resumes from, each in a copy."""
    work = tmp_path_factory.mktemp("resume_rules")
    data = (shakespeare_path, work / "cache")
    result = run_train(None, *_args(work / "run", data, "--trainer.max_steps", BASE_STEPS))
    assert result.returncode == 0
    return work / "run", data


def _copy(base: tuple, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base[0], run)
    return run


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory, shakespeare_text) -> Path:
    """Shakespeare with its one '$' written as '#': as many characters (65), but not the same ones."""
    text = shakespeare_text
    assert text.count("$") == 1 and "#" not in text
    path = tmp_path_factory.mktemp("vocab") / "other.txt"
    path.write_text(text.replace("$", "#"), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--model.weight_decay", "0.2", "weight_decay: 0.1 -> 0.2"),
        ("--model.beta1", "0.8", "beta1: 0.9 -> 0.8"),
        ("--model.beta2", "0.95", "beta2: 0.99 -> 0.95"),
        ("--model.muon_ns_steps", "4", "muon_ns_steps: 5 -> 4"),
        ("--model.block_size", "48", "block_size: 32 -> 48"),
        ("--model.bias", "false", "bias: True -> False"),
        ("--model.activation", "relu", "activation: 'gelu' -> 'relu'"),
        ("--data.source", None, "vocabulary differs"),
    ],
    ids=["weight_decay", "beta1", "beta2", "muon_ns_steps", "block_size", "bias", "activation", "vocabulary"],
)
def test_resume_refuses_a_changed_setting_and_names_it(base, other_vocabulary, tmp_path, capsys, flag, value,
                                                       fragment):
    run = _copy(base, tmp_path)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    value = other_vocabulary if value is None else value
    result = run_train(capsys, *_args(run, base[1], "--trainer.max_steps", BASE_STEPS + 3, "--ckpt_path", "last",
                                      flag, value))
    assert_user_error(result, fragment)
    if flag == "--data.source":  # the characters each way
        assert_user_error(result, "new characters ['#']", "missing ['$']")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before  # not a byte written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == files  # no file added or removed


def _monitor_state(ckpt: dict) -> dict:
    return ckpt["callbacks"]["TrainingMonitor"]


def _resume(base: tuple, tmp_path: Path, capsys, *extra) -> Path:
    run = _copy(base, tmp_path)
    result = run_train(capsys, *_args(run, base[1], "--trainer.max_steps", BASE_STEPS + 3, "--ckpt_path", "last",
                                      *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def unchanged(base, tmp_path_factory) -> Path:
    """The base run resumed for 3 more steps with its own settings: what a changed setting must differ from."""
    return _resume(base, tmp_path_factory.mktemp("unchanged"), None)


@pytest.mark.slow  # trains (in this process) a few steps more
@pytest.mark.parametrize(
    "flag, value", [("--data.batch_size", "8"), ("--data.seed", "7"), ("--model.dropout", "0.2")],
    ids=["batch_size", "data.seed", "dropout"],
)
def test_resume_accepts_a_changed_batch_size_seed_or_dropout(base, unchanged, tmp_path, capsys, flag, value):
    run = _resume(base, tmp_path, capsys, flag, value)
    before = torch.load(base[0] / "checkpoints" / "last.ckpt", weights_only=True)
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == BASE_STEPS + 3
    losses, reference = read_scalars(run)["train/loss"], read_scalars(unchanged)["train/loss"]
    assert [s for s, _ in losses] == list(range(BASE_STEPS + 3))  # the curves continue: every step once
    # the steps before the resume are the base run's; the new value changes the ones after it
    assert losses[:BASE_STEPS] == reference[:BASE_STEPS]
    assert all(a != b for (_, a), (_, b) in zip(losses[BASE_STEPS:], reference[BASE_STEPS:]))
    batch = 8 if flag == "--data.batch_size" else 16
    assert _monitor_state(after)["tokens_seen"] == _monitor_state(before)["tokens_seen"] + 3 * batch * 32
    if flag == "--model.dropout":
        assert after["hyper_parameters"]["dropout"] == 0.2
    assert f"{flag.split('.')[-1]}: {value}" in (run / "config.yaml").read_text(encoding="utf-8")


@pytest.mark.slow  # two training runs (in this process)
def test_validation_never_shifts_the_training_random_stream(base, tmp_path):
    """Dropout on: a run validated every 3 steps and one never validated draw the same masks, so they train alike."""
    runs = {}
    for every in (3, 1000):
        run = tmp_path / f"val{every}"
        result = run_train(None, *_args(run, base[1], "--trainer.max_steps", 9, "--trainer.val_check_interval", every,
                                        "--data.val_blocks", 16, "--monitor.sample_tokens", 20))
        assert result.returncode == 0
        runs[every] = run
    validated, plain = read_scalars(runs[3]), read_scalars(runs[1000])
    assert [s for s, _ in validated["val/loss"]] == [2, 5, 8] and "val/loss" not in plain
    assert validated["train/loss"] == plain["train/loss"]  # bit for bit, step by step
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
