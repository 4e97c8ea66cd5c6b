"""A run dir that stops taking writes mid-run (no space, a file size limit, read-only, deleted): one error line with
exit 3, the earlier checkpoints intact, no temp file left, and a resume that ends where an uninterrupted run does.

The faults are real and need no root: a file size limit (RLIMIT_FSIZE, what `ulimit -f` sets) lowered inside the
training process once its first checkpoint is written, so later writes fail with EFBIG as a full disk fails them
with ENOSPC; a read-only checkpoint dir (chmod, or chattr +i where the tests run as root); a deleted run dir.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.io import check_resumable, storage_error, storage_failure
from nanogpt.training.checkpointing import AtomicCheckpointIO
from nanogpt.errors import StorageError
from tests.conftest import TINY_CONFIG, assert_user_error, run_script
from tests.training.test_runlock import callback_config

OFFLINE_URL = "http://127.0.0.1:9/input.txt"
MAX_STEPS = 20
# a checkpoint every 5 steps, a validation every 10, the cosine ending at MAX_STEPS in every run
ARGS = ["--config", TINY_CONFIG, "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_steps", "5", "--model.decay_steps", str(MAX_STEPS)]


class StorageFault(Callback):
    """Test helper loaded by train.py through --config: after optimizer step `step`, the run dir stops taking
    writes. how="fsize": files may not grow past half the newest checkpoint's size (RLIMIT_FSIZE); "readonly": the
    checkpoint dir is made read-only; "vanish": the whole run dir is deleted."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        ckpts = Path(trainer.default_root_dir) / "checkpoints"
        if self.how == "fsize":
            limit = (ckpts / "last.ckpt").stat().st_size // 2  # far above the event file's size
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif self.how == "readonly":
            make_read_only(ckpts)
        else:
            shutil.rmtree(trainer.default_root_dir)


def make_read_only(directory: Path) -> None:
    if os.geteuid() == 0:  # root writes through permission bits: an immutable dir refuses even root
        subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
    else:
        directory.chmod(0o555)


def make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=False, capture_output=True)
    directory.chmod(0o755)


def _can_make_read_only(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        make_read_only(probe)
    except (OSError, subprocess.CalledProcessError):
        return False
    try:
        (probe / "x").touch()
        return False
    except OSError:
        return True
    finally:
        make_writable(probe)


@contextmanager
def run_dir_broken(tmp_path: Path, ckpts: Path, how: str) -> Iterator[None]:
    """For the block, the checkpoint dir made read-only ("readonly", skipped where it cannot be) or the run dir
    deleted ("vanish"); a read-only dir is writable again afterwards."""
    if how == "readonly":
        if not _can_make_read_only(tmp_path):
            pytest.skip("cannot make a dir read-only here (root without chattr)")
        make_read_only(ckpts)
    else:
        shutil.rmtree(tmp_path / "run")
    try:
        yield
    finally:
        if how == "readonly":
            make_writable(ckpts)


def _train(run: Path, cache: Path, *extra, resume: bool = False):
    args = [*ARGS, "--trainer.max_steps", MAX_STEPS, "--trainer.default_root_dir", run, *extra]
    if resume:
        args += ["--ckpt_path", "last"]
    return run_script("train.py", *args, cwd=run.parent,
                      env={"NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": OFFLINE_URL})


def _fault_config(tmp_path: Path, how: str, step: int = 7) -> Path:
    return callback_config(tmp_path, "tests.training.test_disk_full.StorageFault", step=step, how=how)


def _names_a_checkpoint_and_its_size(stderr: str, ckpts: Path) -> bool:
    # which file of the step fails first (best.ckpt at a validation, else a step checkpoint) is the callback's
    return re.search(rf"could not write {re.escape(str(ckpts))}/\S+\.ckpt \(it needs about 1\.3 MB\)", stderr) is not None


def _temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, nanogpt_cache) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    result = _train(run, nanogpt_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_full_disk_at_a_save_is_one_line_and_the_run_resumes_to_the_same_weights(straight, nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    result = _train(run, nanogpt_cache, "--config", _fault_config(tmp_path, "fsize"))
    ckpts = run / "checkpoints"
    # the saves of step 10 fail: last.ckpt of step 5 is what is safe, and what --ckpt_path last resumes
    assert_user_error(result, "File too large", f"{ckpts / 'last.ckpt'} (step 5) is intact", "ulimit -f",
                      "--ckpt_path last")
    assert _names_a_checkpoint_and_its_size(result.stderr, ckpts)
    assert result.returncode == 3
    assert not _temp_files(run)
    assert check_resumable(ckpts / "last.ckpt")["global_step"] == 5
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step-00000005.ckpt"]

    resumed = _train(run, nanogpt_cache, resume=True)  # space is back (a new process: no limit)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.slow
def test_a_read_only_checkpoint_dir_is_one_line(nanogpt_cache, tmp_path):
    if not _can_make_read_only(tmp_path):
        pytest.skip("cannot make a dir read-only here (root without chattr); "
                    "test_a_failed_save_is_a_storage_error_naming_what_is_safe[readonly] covers the path")
    run = tmp_path / "run"
    try:
        result = _train(run, nanogpt_cache, "--config", _fault_config(tmp_path, "readonly"))
    finally:
        if (run / "checkpoints").exists():
            make_writable(run / "checkpoints")
    assert_user_error(result, f"{run / 'checkpoints' / 'last.ckpt'} (step 5) is intact", "make the run dir writable")
    assert _names_a_checkpoint_and_its_size(result.stderr, run / "checkpoints")
    assert result.returncode == 3
    assert not _temp_files(run)
    assert check_resumable(run / "checkpoints" / "last.ckpt")["global_step"] == 5


@pytest.mark.slow
def test_a_run_dir_deleted_mid_run_is_one_line_and_not_recreated(nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    result = _train(run, nanogpt_cache, "--config", _fault_config(tmp_path, "vanish"))
    # the first write after the deletion fails: an event file (TensorBoard's writer thread, seen by the next log
    # call) or a checkpoint, whichever comes first
    assert_user_error(result, f"could not write {run}/", "no complete checkpoint", "restore or remount the run dir",
                      "then start the run again")
    assert result.returncode == 3
    assert not run.exists()  # neither the save nor the shutdown quietly started a new run dir


# ---- in process: the same code paths, on real faults of a small write -------------------------------------------


@pytest.mark.parametrize("how", ["fsize", "readonly", "vanish"])
def test_a_failed_save_is_a_storage_error_naming_what_is_safe(tmp_path, how):
    """AtomicCheckpointIO's translation on one real fault each (the twin of the slow tests, where no train runs).

    The file size limit is set in a child process (it would bind pytest's own files too); read-only uses chmod
    or chattr and is skipped only where neither works (root without chattr)."""
    if how == "fsize":
        code = textwrap.dedent(f"""
            import resource, signal, torch
            from nanogpt.training.checkpointing import AtomicCheckpointIO
            from nanogpt.errors import StorageError
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            io = AtomicCheckpointIO()
            io.save_checkpoint({{"global_step": 3, "state_dict": {{"w": torch.ones(10)}}}}, "{tmp_path}/last.ckpt")
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
            try:
                io.save_checkpoint({{"global_step": 4, "state_dict": {{"w": torch.ones(500_000)}}}},
                                   "{tmp_path}/last.ckpt")
            except StorageError as e:
                print(e, e.exit_code)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert out.returncode == 0, out.stderr
        message = out.stdout
        assert "it needs about 2.0 MB" in message and "File too large" in message, message
        assert message.strip().endswith(" 3")
    else:
        io = AtomicCheckpointIO()
        ckpts = tmp_path / "run" / "checkpoints"
        io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(10)}, "optimizer_states": [],
                            "loops": {}}, ckpts / "last.ckpt")
        with run_dir_broken(tmp_path, ckpts, how):
            with pytest.raises(StorageError) as raised:
                io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(10)}}, ckpts / "step-4.ckpt")
        message = str(raised.value)
        if how == "readonly":
            assert f"{ckpts / 'last.ckpt'} (step 3) is intact" in message and "writable" in message, message
            assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
        else:
            assert "no complete checkpoint" in message and "restore or remount" in message, message
            assert not ckpts.exists()


def test_storage_failure_finds_the_os_error_behind_wrappers():
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise disk_full
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672]") from e  # what torch.save raises
    except RuntimeError as wrapped:
        assert storage_failure(wrapped) is disk_full
    assert storage_failure(ValueError("bad value")) is None
    assert storage_failure(OSError(errno.ECONNREFUSED, "refused")) is None  # not a storage fault
    error = storage_error(disk_full, "RUN/events.out.tfevents.1", None)
    assert isinstance(error, StorageError) and error.exit_code == 3
    assert str(error) == ("could not write RUN/events.out.tfevents.1: No space left on device. To continue, free some "
                          "space (or move the run dir to a larger disk), then rerun with --ckpt_path last")


def test_a_tensorboard_write_that_fails_for_space_is_found_behind_the_loggers_wrapper(tmp_path):
    """Lightning's TensorBoardLogger wraps a failed write in a ValueError: main() still finds the OSError under it,
    and reports it like a failed checkpoint (exit 3), while the checkpoints, written atomically apart, stay whole."""
    code = textwrap.dedent(f"""
        import resource, signal
        from lightning.pytorch.loggers import TensorBoardLogger
        from nanogpt.io import storage_failure
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        logger = TensorBoardLogger("{tmp_path}", name="", version="")
        logger.log_metrics({{"x": 1.0}}, step=0)
        logger.experiment.flush()
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
        try:
            for step in range(1, 200):
                logger.log_metrics({{"x": float(step)}}, step=step)
            logger.experiment.flush()
            for step in range(200, 400):
                logger.log_metrics({{"x": float(step)}}, step=step)
            print("no failure")
        except Exception as e:
            print(type(e).__name__, storage_failure(e).errno)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(errno.EFBIG), out.stdout + out.stderr
