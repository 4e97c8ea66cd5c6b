"""RunCheckpointIO on real files: one write per save point, the other names hard links, pruning that deletes names
only, background writes that copy the state first, fail with the storage error, and finish before fit returns."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.errors import StorageError
from nanogpt.io import check_resumable
from nanogpt.training.checkpoint_io import RunCheckpointIO
from tests.training.test_disk_full import run_dir_broken

ASYNC = pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])


def _state(step: int, value: float = 1.0) -> dict:
    """A checkpoint dict of train.py's shape (weights, optimizer state, loops), small."""
    w = torch.full((64, 64), value)
    return {"global_step": step, "state_dict": {"model.w": w, "model.tied": w},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(64, 64)}}}], "loops": {}}


def _save_point(io: RunCheckpointIO, ckpts: Path, step: int, *names: str, remove=(), value: float = 1.0) -> dict:
    """What the callbacks do at one step: ask for each name (last.ckpt last), prune, then commit."""
    state = _state(step, value)
    for name in names:
        io.save_checkpoint(state, ckpts / name)
    for name in remove:
        io.remove_checkpoint(ckpts / name)
    io.save_checkpoint(state, ckpts / "last.ckpt")
    io.commit()
    return state


def _inodes(ckpts: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in sorted(ckpts.glob("*.ckpt"))}


@ASYNC
def test_a_save_point_is_written_once_and_every_other_name_is_a_link(tmp_path, async_save):
    ckpts = tmp_path / "checkpoints"
    io = RunCheckpointIO(async_save=async_save)
    _save_point(io, ckpts, 10, "step-00000010.ckpt")  # every N steps
    io.wait()
    first = (ckpts / "last.ckpt").stat().st_ino
    _save_point(io, ckpts, 10, "best.ckpt")  # the validation of the same step: its newer state under every name
    io.wait()
    inodes = _inodes(ckpts)
    assert first not in inodes.values()
    assert len(set(inodes.values())) == 1 and (ckpts / "last.ckpt").stat().st_nlink == 3, inodes
    for path in ckpts.glob("*.ckpt"):  # each name an ordinary checkpoint on its own
        assert torch.load(path, weights_only=True)["global_step"] == 10
    # the next save point prunes step 10: the name goes, best.ckpt keeps the data
    _save_point(io, ckpts, 20, "step-00000020.ckpt", remove=["step-00000010.ckpt"], value=2.0)
    io.teardown()
    assert sorted(_inodes(ckpts)) == ["best.ckpt", "last.ckpt", "step-00000020.ckpt"]
    assert len(set(_inodes(ckpts).values())) == 2
    best = check_resumable(ckpts / "best.ckpt")
    assert best["global_step"] == 10 and float(best["state_dict"]["model.w"][0, 0]) == 1.0
    assert torch.load(ckpts / "step-00000020.ckpt", weights_only=True)["global_step"] == 20
    assert not list(ckpts.glob(".*"))  # no temp names left


def test_names_are_copies_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT and some network file systems answer

    monkeypatch.setattr(os, "link", no_links)
    ckpts = tmp_path / "checkpoints"
    io = RunCheckpointIO(async_save=True)
    _save_point(io, ckpts, 5, "best.ckpt")
    io.teardown()
    assert len(set(_inodes(ckpts).values())) == 2
    assert (ckpts / "best.ckpt").read_bytes() == (ckpts / "last.ckpt").read_bytes()


def test_an_async_save_copies_the_state_before_training_changes_it(tmp_path):
    ckpts = tmp_path / "checkpoints"
    io = RunCheckpointIO(async_save=True)
    state = _save_point(io, ckpts, 3, value=1.0)
    state["state_dict"]["model.w"].fill_(7.0)  # the next optimizer step, while the file may still be written
    io.wait()
    assert float(torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]["model.w"].max()) == 1.0


@pytest.mark.parametrize("how", ["readonly", "vanish"])
def test_a_failed_background_write_is_the_storage_error_and_keeps_the_older_file(tmp_path, how):
    ckpts = tmp_path / "run" / "checkpoints"
    io = RunCheckpointIO(async_save=True)
    _save_point(io, ckpts, 5)
    io.wait()
    with run_dir_broken(tmp_path, ckpts, how):
        _save_point(io, ckpts, 10, "step-00000010.ckpt")  # returns: the write fails in the background
        with pytest.raises(StorageError) as raised:
            io.wait()
    message = str(raised.value)
    assert raised.value.exit_code == 3 and "\n" not in message
    if how == "readonly":
        assert f"{ckpts / 'last.ckpt'} (step 5) is intact" in message, message
        assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # no temp file, no step-10 name
        assert check_resumable(ckpts / "last.ckpt")["global_step"] == 5
    else:
        assert "restore or remount the run dir" in message and not ckpts.exists(), message
    io.teardown()  # reported once: Lightning's teardown after the error does not raise it again


def test_a_cancelled_background_write_leaves_the_older_file_and_no_temp_file(tmp_path):
    ckpts = tmp_path / "checkpoints"
    io = RunCheckpointIO(async_save=True)
    _save_point(io, ckpts, 5)
    io.wait()
    io.files.cancelled.set()  # Ctrl-C: what RunCheckpointIO.cancel sets, here before the write's first chunk
    _save_point(io, ckpts, 10, "step-00000010.ckpt")
    io.wait()  # given up, not an error
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert check_resumable(ckpts / "last.ckpt")["global_step"] == 5


class _BigStateThenFail(Callback):
    """Makes each checkpoint 32 MB (a write that takes a while) and fails right after the save of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ballast"] = torch.ones(8 * 2**20)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def test_a_save_in_flight_at_an_exception_is_finished_before_fit_returns(tmp_path, shakespeare_text):
    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.training.checkpointing import run_checkpoints
    from nanogpt.training.module import GPTModule

    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=16, batch_size=4, val_blocks=4, cache_dir=str(tmp_path / "c"))
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    ckpts = tmp_path / "run" / "checkpoints"
    io = RunCheckpointIO(async_save=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, val_check_interval=100, check_val_every_n_epoch=None, max_epochs=-1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path / "run",
        plugins=[io], callbacks=[_BigStateThenFail(step=4), *run_checkpoints(str(ckpts), every_n_steps=4)],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=dm)
    # the save of step 4 was committed in the background just before the error: complete, with its step file
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000004.ckpt"]
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["ballast"].numel() == 8 * 2**20
    assert (ckpts / "last.ckpt").stat().st_ino == (ckpts / "step-00000004.ckpt").stat().st_ino


def test_ckpt_path_best_resolves_to_the_run_dirs_best_checkpoint(tmp_path):
    from nanogpt.errors import NanoGPTError
    from nanogpt.training.cli import resolve_ckpt_path

    run = tmp_path / "run"
    with pytest.raises(NanoGPTError, match="best.ckpt does not exist"):
        resolve_ckpt_path("best", run)
    io = RunCheckpointIO(async_save=False)
    _save_point(io, run / "checkpoints", 7, "best.ckpt")
    assert resolve_ckpt_path("best", run) == str(run / "checkpoints" / "best.ckpt")


class Ballast(Callback):
    """Test helper loaded by train.py through --config: makes every checkpoint `mb` MB larger, so its background
    write takes long enough to be killed in the middle."""

    def __init__(self, mb: int) -> None:
        self.mb = mb

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ballast"] = torch.ones(self.mb * 2**18)


@pytest.mark.slow
def test_kill_9_during_a_background_write_leaves_a_resumable_run(nanogpt_cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from nanogpt.io import pick_resume_checkpoint
    from tests.conftest import REPO, TINY_CONFIG, run_script
    from tests.training.test_runlock import callback_config

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {**os.environ, "NANOGPT_CACHE": str(nanogpt_cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/x"}
    args = ["--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--checkpoint.every_n_steps", 5]
    ballast = callback_config(tmp_path, "tests.training.test_checkpoint_io.Ballast", mb=96)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args), "--config", str(ballast),
                             "--trainer.max_steps", "40"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # a later save's temp file beside the first save's last.ckpt: the background write is under way
        deadline = time.monotonic() + 600
        while not ((ckpts / "last.ckpt").exists() and list(ckpts.glob(".last.ckpt.*.tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no second save seen"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert list(ckpts.glob(".*.tmp"))  # killed mid-write: the half-written temp file is still there
    good = pick_resume_checkpoint(ckpts, log=lambda message: None)
    step = check_resumable(good)["global_step"]
    assert step % 5 == 0 and step > 0
    resumed = run_script("train.py", *args, "--trainer.max_steps", step + 2, "--ckpt_path", "last", cwd=tmp_path,
                         env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == step + 2
    assert not list(ckpts.glob(".*.tmp"))  # removed when the run started again
