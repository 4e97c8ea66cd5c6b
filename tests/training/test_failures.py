"""Failures and what a user sees (README "Failures and what you see"): NaN exits 2, a second Ctrl-C aborts at
once leaving the previous checkpoint, a killed writer's temp file is cleaned up on the next start."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.io import check_resumable
from tests.conftest import TINY_CONFIG, assert_user_error, run_script, run_train


def _args(run: Path, corpus: Path, *extra) -> list:
    # the corpus file, and a data cache beside the run: no download
    return ["--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "1000", "--data.source", corpus, "--data.cache_dir", run.parent / "cache",
            "--quiet", *extra]


def test_a_nan_loss_exits_2_with_one_line(tmp_path, capsys, shakespeare_path):
    poison = tmp_path / "poison.yaml"
    poison.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.training.test_resume.PoisonWeights\n"
        "      init_args: {step: 3, when: start}\n",
        encoding="utf-8",
    )
    result = run_train(capsys, *_args(tmp_path / "run", shakespeare_path, "--trainer.max_steps", 6,
                                      "--config", poison))
    assert result.returncode == 2
    assert_user_error(result, "became NaN or inf at step 3")


class _SigintWhilePickled:
    """Put into a checkpoint, it sends this process SIGINT while torch.save is writing the file."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (dict, ())


class CtrlCTwice(Callback):
    """Test helper loaded by train.py through --config: presses Ctrl-C (a real SIGINT to this process) after
    step `step`, and again while the checkpoint that first Ctrl-C asked for is being written: the worst moment."""

    def __init__(self, step: int) -> None:
        self.step, self.pressed = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.pressed:
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.pressed:
            checkpoint["second_ctrl_c"] = _SigintWhilePickled()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_leaves_the_previous_checkpoint(tmp_path, shakespeare_path):
    config = tmp_path / "ctrl_c.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tests.training.test_failures.CtrlCTwice\n"
                      "      init_args: {step: 12}\n", encoding="utf-8")
    run = tmp_path / "run"
    result = run_script("train.py", *_args(run, shakespeare_path, "--trainer.max_steps", 100,
                                           "--checkpoint.every_n_steps", 5, "--config", config), cwd=tmp_path)
    # not the first Ctrl-C's clean stop (exit 130 after saving step 12): aborted during that save
    assert result.returncode not in (0, 130), result.stderr[-3000:]
    assert "stopped:" not in result.stderr, result.stderr[-3000:]
    assert "Detected KeyboardInterrupt" in result.stderr, result.stderr[-3000:]
    ckpts = run / "checkpoints"
    # the save of step 12 never happened: no temp file left, and the step-10 checkpoint is whole and resumable
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000005.ckpt", "step-00000010.ckpt"]
    assert check_resumable(ckpts / "last.ckpt")["global_step"] == 10
    # --quiet prints a step's line when the next step starts: the line of step 12 never came
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if line.startswith("step ")][-1] == "step 11/100"
    resumed = run_script("train.py", *_args(run, shakespeare_path, "--trainer.max_steps", 14, "--ckpt_path",
                                            "last"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 14


def test_a_stale_temp_checkpoint_is_deleted_on_the_next_start(tmp_path, shakespeare_path):
    run = tmp_path / "run"
    assert run_train(None, *_args(run, shakespeare_path, "--trainer.max_steps", 3)).returncode == 0
    ckpts = run / "checkpoints"
    # what a writer killed mid-save leaves (nanogpt.io writes ".<name>.<random>.tmp" beside the target)
    stale = [ckpts / ".last.ckpt.k3j9x1ab.tmp", ckpts / ".step-00000003.ckpt.q8w2e4rt.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (ckpts / "notes.txt").write_text("mine", encoding="utf-8")  # not a temp file: kept
    assert run_train(None, *_args(run, shakespeare_path, "--trainer.max_steps", 4, "--ckpt_path", "last")).returncode == 0
    assert not any(p.exists() for p in stale)
    assert (ckpts / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
