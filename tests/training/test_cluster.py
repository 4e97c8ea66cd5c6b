"""--ckpt_path auto, SIGUSR1 and torchrun elastic restarts, on real train.py processes (nanogpt/training/cluster.py).

The SLURM side of the same story is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from nanogpt.errors import NanoGPTError, hide_srun_hint
from nanogpt.training.cli import _signals_exit, resolve_ckpt_path
from nanogpt.training.cluster import one_checkpoint_mechanism, requeue_id, requeue_job, restart_of
from nanogpt.training.runlock import LOCK_NAME, RunLock
from tests.conftest import REPO, read_scalars, run_train
from tests.training.restarts import (ARGS, MAX_STEPS, OFFLINE, assert_one_run_same_weights, callbacks, load, starts,
                                     wait_for)

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME", "SLURM_PROCID",
                   "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def no_scheduler(monkeypatch):
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _fake_srun(directory: Path) -> str:
    """A PATH with an `srun` on it, as on every SLURM login node (Lightning only looks for it)."""
    srun = directory / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


# ---- --ckpt_path auto: which checkpoint, what it refuses -----------------------------------------------------------


def test_auto_starts_fresh_in_a_new_run_dir_and_a_plain_start_still_refuses_a_used_one(tmp_path, no_scheduler,
                                                                                       monkeypatch):
    assert resolve_ckpt_path("auto", tmp_path / "new") is None
    (tmp_path / "checkpoints").mkdir()
    assert resolve_ckpt_path("auto", tmp_path) is None  # an empty checkpoints dir: nothing to resume
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(NanoGPTError, match="already holds checkpoints") as refused:
        resolve_ckpt_path(None, tmp_path)
    assert "restarted job" not in str(refused.value)
    # a restart by the launcher does not mean auto (decided: see restart_hint), but the refusal says what to add
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(NanoGPTError, match=r"TORCHELASTIC_RESTART_COUNT=1: put --ckpt_path auto"):
        resolve_ckpt_path(None, tmp_path)


@pytest.mark.slow
def test_auto_resumes_the_newest_intact_checkpoint_and_refuses_when_none_is(uninterrupted_ddp, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_ddp, run)
    ckpts = run / "checkpoints"
    assert resolve_ckpt_path("auto", run) == str(ckpts / "last.ckpt")
    (ckpts / "last.ckpt").write_bytes(load(ckpts / "last.ckpt")["global_step"].to_bytes(8, "little"))  # damaged
    newest_step = sorted(ckpts.glob("step-*.ckpt"))[-1]
    assert resolve_ckpt_path("auto", run) == str(newest_step)
    assert "Resuming from the newest good checkpoint" in capsys.readouterr().err
    for path in ckpts.glob("step-*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(NanoGPTError, match=r"^--ckpt_path auto: no checkpoint in .* can be resumed"):
        resolve_ckpt_path("auto", run)


@pytest.mark.slow
def test_auto_refuses_another_model_shape_before_training_starts(uninterrupted_ddp, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_ddp, run)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    result = run_train(capsys, *ARGS, "--trainer.default_root_dir", run, "--ckpt_path", "auto", "--model.n_layer", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "n_layer: 2 -> 3" in errors[0], result.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


# ---- the launchers' variables ------------------------------------------------------------------------------------


def test_a_time_limit_warning_after_training_ended_is_ignored():
    """SIGUSR1 that comes once training is over has nothing to save or requeue: it neither stops the process (its
    default action, which SLURM would count as a failed job) nor raises; before that it stops through Python."""
    with pytest.raises(BaseException) as stopped:
        with _signals_exit():
            os.kill(os.getpid(), signal.SIGUSR1)
    assert getattr(stopped.value, "signum", None) == signal.SIGUSR1
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with _signals_exit() as training_finished:
            training_finished()
            os.kill(os.getpid(), signal.SIGUSR1)  # would raise (or, with the default action, kill this process)
        os.kill(os.getpid(), signal.SIGUSR1)  # and still after the block
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_requeue_id_names_the_array_task_and_only_rank_0_requeues():
    assert requeue_id({"SLURM_JOB_ID": "42"}) == "42"
    assert requeue_id({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == "40_3"
    assert requeue_id({}) is None
    assert not requeue_job({}, log=print)  # not a SLURM job: nothing to requeue
    assert not requeue_job({"SLURM_JOB_ID": "42", "SLURM_PROCID": "1"}, log=print)  # rank 0 requeues, alone
    assert restart_of({"SLURM_RESTART_COUNT": "0"}) is None
    assert restart_of({"SLURM_RESTART_COUNT": "2"}) == "SLURM_RESTART_COUNT=2"


def test_under_slurm_lightning_auto_requeue_is_off(monkeypatch, no_scheduler):
    assert one_checkpoint_mechanism([]) == []  # not under SLURM: Lightning picks its environment as usual
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
                        "SLURM_JOB_NAME": "nanogpt"}.items():
        monkeypatch.setenv(name, value)
    (environment,) = one_checkpoint_mechanism([])
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    given = SLURMEnvironment()
    assert one_checkpoint_mechanism([given]) == [given] and given.auto_requeue is False


def test_lightning_srun_hint_only_inside_a_slurm_job(tmp_path, monkeypatch, no_scheduler):
    monkeypatch.setenv("PATH", _fake_srun(tmp_path))
    for inside in (False, True):
        if inside:
            monkeypatch.setenv("SLURM_JOB_ID", "7")  # a job whose script forgot srun: there the hint is right
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hide_srun_hint()
            SLURMEnvironment.detect()  # what Lightning's Trainer and Fabric run at start-up
        hints = [w for w in caught if "`srun` command is available" in str(w.message)]
        assert len(hints) == int(inside)


def test_a_restarted_job_takes_over_its_own_lock_left_on_another_node(tmp_path, monkeypatch, no_scheduler):
    """A start killed outright (SIGKILL after SLURM's KillWait, a lost node) leaves run.lock behind, and the requeued
    job may start on another node: that lock is its own earlier start's, taken over; any other host's is refused."""
    stale = {"host": "node-that-died", "pid": 4242, "started": "2026-01-01 00:00:00+00:00",
             "job": "SLURM_JOB_ID=77", "restart": 0}
    notes = []
    for restart, job, taken in (("0", "77", False), ("1", "78", False), ("1", "77", True)):
        (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
        lock = RunLock(tmp_path, log=notes.append)
        if not taken:
            with pytest.raises(NanoGPTError, match="locked by a run on another host"):
                lock.acquire()
            continue
        with lock:
            held = json.loads((tmp_path / LOCK_NAME).read_text())
            assert (held["job"], held["restart"], held["pid"]) == ("SLURM_JOB_ID=77", 1, os.getpid())
    assert len(notes) == 1 and "from an earlier start of this job (SLURM_JOB_ID=77" in notes[0]


def test_nanogpt_eval_shows_no_srun_hint_outside_slurm(random_checkpoint, tmp_path, monkeypatch, capsys,
                                                      no_scheduler):
    from nanogpt.evaluate import main as evaluate_main

    monkeypatch.setenv("PATH", _fake_srun(tmp_path))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_main(["--ckpt", str(random_checkpoint), "--source", str(text), "--device", "cpu"])
    assert '"loss"' in capsys.readouterr().out  # it evaluated, through Lightning Fabric
    assert not [w for w in caught if "`srun` command is available" in str(w.message)]


# ---- SIGUSR1 without a scheduler, then auto --------------------------------------------------------------------


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_then_auto_finishes_the_run(tmp_path, nanogpt_cache, no_scheduler):
    run, probe = tmp_path / "run", tmp_path / "starts.jsonl"
    env = {**os.environ, "NANOGPT_CACHE": str(nanogpt_cache), **OFFLINE, "PYTHONPATH": str(REPO),
           "PATH": _fake_srun(tmp_path)}
    command = [sys.executable, str(REPO / "train.py"), *ARGS, "--trainer.default_root_dir", str(run),
               "--ckpt_path", "auto"]
    proc = subprocess.Popen([*command, *callbacks(probe, 0.2)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run / "checkpoints" / "step-00000010.ckpt", lambda: proc.poll() is None)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "stopped: SIGUSR1 received: stopped after step" in stderr and "Traceback" not in stderr
    assert "requeue" not in stderr  # no SLURM job to requeue
    assert "`srun` command is available" not in stderr  # srun is on the PATH, but this is no SLURM job
    stopped = load(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 10 <= stopped < MAX_STEPS

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
    assert [s for s, _ in read_scalars(run)["train/loss"]] == list(range(MAX_STEPS))
    assert starts(probe)[0]["step"] == 0  # auto started fresh, then (below) resumed
    assert f"Restored all states from the checkpoint at {run}/checkpoints/last.ckpt" in result.stdout + result.stderr


@pytest.mark.slow
def test_sigusr1_before_training_exits_at_once_and_requeues_the_slurm_job(tmp_path, nanogpt_cache, no_scheduler):
    """SIGUSR1 that comes before training starts (a job still starting when its time runs out): no checkpoint to
    write, the lock released, and the job requeued all the same (here `scontrol` is a stand-in that records its
    arguments: the real requeue is test_slurm.py's)."""
    run, flag, calls = tmp_path / "run", tmp_path / "holding", tmp_path / "scontrol.txt"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    hold = json.dumps({"class_path": "tests.training.restarts.Hold", "init_args": {"flag": str(flag)}})
    env = {**os.environ, "NANOGPT_CACHE": str(nanogpt_cache), **OFFLINE, "PYTHONPATH": str(REPO),
           "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "31"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *ARGS, "--trainer.default_root_dir", str(run), "--ckpt_path", "auto",
         "--trainer.callbacks+", hold], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for(flag, lambda: proc.poll() is None)
        assert (run / "run.lock").exists()
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "stopped: SIGUSR1 received outside the training loop" in stderr and "Traceback" not in stderr
    assert "requeued SLURM job 31" in stderr
    assert calls.read_text().split() == ["requeue", "31"]
    assert not (run / "run.lock").exists() and not (run / "checkpoints").exists()


# ---- torchrun elastic ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(launcher: int, rank: int) -> int:
    """The PID of the worker with RANK=rank among the launcher's children."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_elastic_restart_resumes_and_ends_bit_identical(uninterrupted_ddp, tmp_path, nanogpt_cache,
                                                                 no_scheduler):
    """The README's elastic recipe on 2 CPU processes: a worker killed (SIGKILL) after the first checkpoint, the
    group restarts, resumes the newest intact checkpoint and ends with an uninterrupted run's weights."""
    run, probe = tmp_path / "run", tmp_path / "starts.jsonl"
    # the recipe's store per attempt: with torchrun's shared one, a restarted worker can read a dead peer's address
    env = {**os.environ, "NANOGPT_CACHE": str(nanogpt_cache), **OFFLINE, "PYTHONPATH": str(REPO),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts",
         "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "elastic-test",
         str(REPO / "train.py"), *ARGS, "--trainer.devices", "2", "--trainer.num_nodes", "1",
         "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(run), "--ckpt_path", "auto",
         *callbacks(probe, 0.3)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(run / "checkpoints" / "step-00000010.ckpt", lambda: proc.poll() is None)
        os.kill(_worker(proc.pid, 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert_one_run_same_weights(uninterrupted_ddp, run, crashed=True)
    first, second = starts(probe)
    assert (first["restart"], second["restart"]) == (0, 1) and second["step"] >= 10
    assert first["lock"]["job"] == second["lock"]["job"] == "TORCHELASTIC_RUN_ID=elastic-test"
