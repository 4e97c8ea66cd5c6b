"""One run per run dir: the lock module on real processes (races, kill -9), then train.py itself: a second start
refused without touching the dir, the lock released on every way a run ends, one lock for a DDP run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from nanogpt.training.cli import main
from nanogpt.errors import NanoGPTError
from nanogpt.training.runlock import LOCK_NAME, RunLock, is_global_rank_zero
from tests.conftest import REPO, TINY_CONFIG, assert_user_error, run_main, run_script

OFFLINE_URL = "http://127.0.0.1:9/input.txt"
# holds a lock in a child process: waits for `go`, tries, says how it went, holds until `release` appears
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nanogpt.errors import NanoGPTError
    from nanogpt.training.runlock import RunLock
    run_dir, ready, go, release = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.001)
    lock = RunLock(run_dir, log=lambda message: print(message, flush=True))
    try:
        lock.acquire()
    except NanoGPTError as e:
        print("refused:", e, flush=True)
        sys.exit(1)
    print("acquired", flush=True)
    while not Path(release).exists():
        time.sleep(0.01)
    lock.release()
""")


def _holder(run_dir: Path, flags: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), str(flags / f"{name}.ready"), str(flags / "go"),
         str(flags / "release")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _holder_record(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_NAME).read_text())


# ---- the lock module, on real processes ---------------------------------------------------------------------------


@pytest.mark.parametrize("environ, zero", [
    ({}, True),  # a plain start; also rank 0 of Lightning's DDP launcher before it starts the others
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun, first process
    ({"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, False),  # torchrun, node 1
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # a process Lightning's launcher started
    ({"NODE_RANK": "1"}, False),  # the first process of node 1 of a Lightning-launched multi-node run
    ({"SLURM_PROCID": "0"}, True),
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's launcher inside a SLURM allocation
    ({"SLURM_PROCID": "5"}, False),
])
def test_global_rank_zero_is_known_from_the_environment(environ, zero):
    assert is_global_rank_zero(environ) is zero


@pytest.mark.parametrize("fresh_dir", [False, True], ids=["existing-dir", "new-dir"])
def test_of_processes_racing_for_one_run_dir_exactly_one_proceeds(tmp_path, fresh_dir):
    run_dir, flags = tmp_path / "run", tmp_path / "flags"
    flags.mkdir()
    if not fresh_dir:
        run_dir.mkdir()
    procs = [_holder(run_dir, flags, str(i)) for i in range(4)]
    try:
        _wait(lambda: all((flags / f"{i}.ready").exists() for i in range(4)), "the processes to start")
        (flags / "go").touch()  # all four try at once
        _wait(lambda: sum(p.poll() is not None for p in procs) == 3, "three refusals")
        (winner,) = [p for p in procs if p.poll() is None]
        holder = _holder_record(run_dir)
        assert holder["pid"] == winner.pid and holder["host"] == socket.gethostname()
        for p in procs:
            if p is not winner:
                out, err = p.communicate()
                assert p.returncode == 1, err
                assert out.startswith(f"refused: run dir {run_dir} is in use by another run"), out
                assert f"PID {winner.pid}" in out or "not written yet" in out, out
    finally:
        (flags / "release").touch()
        for p in procs:
            p.wait(timeout=60)
    assert winner.returncode == 0, winner.stderr.read()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_lock_left_by_kill_9_is_taken_over_saying_so(tmp_path):
    run_dir, flags = tmp_path / "run", tmp_path / "flags"
    flags.mkdir()
    proc = _holder(run_dir, flags, "dead")
    (flags / "go").touch()
    _wait(lambda: (run_dir / LOCK_NAME).exists() and (run_dir / LOCK_NAME).stat().st_size > 0, "the lock")
    with pytest.raises(NanoGPTError, match=f"in use by another run .*PID {proc.pid}"):
        RunLock(run_dir).acquire()  # alive: refused
    proc.kill()
    proc.wait()
    notes: list[str] = []
    with RunLock(run_dir, log=notes.append):
        assert _holder_record(run_dir)["pid"] == os.getpid()
    (note,) = notes
    assert note.startswith(f"note: took over the lock of run dir {run_dir}") and f"PID {proc.pid}" in note, note
    assert not (run_dir / LOCK_NAME).exists()


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01 10:00:00+00:00"}))
    before = lock.read_bytes()
    with pytest.raises(NanoGPTError) as raised:
        RunLock(tmp_path).acquire()
    message = str(raised.value)
    assert "locked by a run on another host (host gpu-node-7, PID 4242, since 2026-01-01 10:00:00+00:00)" in message
    assert f"if you know that run is dead, delete {lock} and start again" in message
    assert lock.read_bytes() == before


def test_a_running_pid_in_a_lock_without_its_flock_is_refused(tmp_path):
    # a filesystem without flock, or a PID reused after a reboot: the PID runs, so the lock is not taken silently
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                                      "started": "earlier"}))
        with pytest.raises(NanoGPTError, match=f"locked by PID {sleeper.pid}, which is running.*delete"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_release_removes_the_lock_and_a_run_dir_it_created_empty(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    for run_dir in (existing, tmp_path / "new" / "run"):
        lock = RunLock(run_dir)
        lock.acquire()
        record = _holder_record(run_dir)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        lock.release()
        lock.release()  # idempotent
        assert not (run_dir / LOCK_NAME).exists()
    assert existing.is_dir() and not (tmp_path / "new" / "run").exists()


def test_a_refused_start_of_train_py_creates_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = run_main(main, capsys, "--config", TINY_CONFIG, "--trainer.default_root_dir", run_dir, "--ckpt_path",
                      "last")
    assert_user_error(result, "--ckpt_path last: there is no")
    assert not run_dir.exists()  # the lock was taken, then released with the dir it made


# ---- train.py ---------------------------------------------------------------------------------------------------

ARGS = ["--config", TINY_CONFIG, "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_steps", "5"]


class Boom(Callback):
    """Test helper loaded by train.py through --config: a bug that raises after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


class LockProbe(Callback):
    """Test helper: each rank writes its global rank, PID and the run dir's lock file as training starts."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        lock = Path(trainer.default_root_dir) / LOCK_NAME
        record = {"rank": trainer.global_rank, "pid": os.getpid(),
                  "lock": json.loads(lock.read_text()) if lock.exists() else None}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _env(cache: Path) -> dict:
    return {"NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": OFFLINE_URL}


def _start(run: Path, cache: Path, *extra, max_steps: int = 1000) -> subprocess.Popen:
    args = [*ARGS, "--trainer.max_steps", max_steps, "--trainer.default_root_dir", run, *extra]
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=run.parent,
                            env={**os.environ, **_env(cache)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _train(run: Path, cache: Path, *extra, max_steps: int = 10):
    return run_script("train.py", *ARGS, "--trainer.max_steps", max_steps, "--trainer.default_root_dir", run,
                      *extra, cwd=run.parent, env=_env(cache))


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen) -> None:
    def saved() -> bool:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        return (run / "checkpoints" / "last.ckpt").exists()  # written atomically, after the step files

    _wait(saved, "the first checkpoint")


def callback_config(tmp_path: Path, class_path: str, **init_args) -> Path:
    """A config file that adds one callback (class_path, init_args) to a train.py run: pass it as a second --config."""
    path = tmp_path / "callback.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args: {json.dumps(init_args)}\n")
    return path


@pytest.mark.slow
def test_a_second_start_while_a_run_is_live_is_refused_and_touches_nothing(nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    first = _start(run, nanogpt_cache)
    try:
        _wait_for_checkpoint(run, first)
        holder = _holder_record(run)
        assert holder["pid"] == first.pid
        config = (run / "config.yaml").stat().st_mtime_ns
        events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
        for resume in ([], ["--ckpt_path", "last"]):  # a new run, and a resume
            second = _train(run, nanogpt_cache, *resume)
            assert_user_error(second, f"run dir {run} is in use by another run",
                              f"host {holder['host']}, PID {first.pid}, since {holder['started']}",
                              "wait for it to finish", "another --trainer.default_root_dir")
        assert (run / "config.yaml").stat().st_mtime_ns == config  # not rewritten
        assert sorted(p.name for p in run.glob("events.out.tfevents.*")) == events  # no second event file
        assert not [p for p in run.rglob("*.ckpt") if "-v" in p.name]  # no last-v1.ckpt
        assert _holder_record(run) == holder
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143, stderr[-3000:]
    assert not (run / LOCK_NAME).exists()  # released on SIGTERM
    resumed = _train(run, nanogpt_cache, "--ckpt_path", "last", max_steps=first_step(run) + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over" not in resumed.stderr  # nothing stale was left
    assert not (run / LOCK_NAME).exists()


def first_step(run: Path) -> int:
    import torch

    return int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "nan", "error"])
def test_the_lock_is_released_however_the_run_stops(nanogpt_cache, tmp_path, how):
    run = tmp_path / "run"
    if how == "ctrl-c":
        proc = _start(run, nanogpt_cache)
        _wait_for_checkpoint(run, proc)
        assert _holder_record(run)["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 130, stderr[-3000:]
    elif how == "nan":
        poison = callback_config(tmp_path, "tests.training.test_resume.PoisonWeights", step=7, when="start")
        result = _train(run, nanogpt_cache, "--config", poison, "--fault.on_bad_step", "stop")
        assert_user_error(result, "became NaN or inf at step 7")
    else:
        result = _train(run, nanogpt_cache, "--config", callback_config(tmp_path, "tests.training.test_runlock.Boom", step=7))
        assert result.returncode == 1 and "RuntimeError: boom" in result.stderr, result.stderr[-3000:]
    assert (run / "checkpoints" / "step-00000005.ckpt").exists()  # it did run
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over_by_the_next_start(nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, nanogpt_cache)
    try:
        _wait_for_checkpoint(run, proc)
    finally:
        proc.kill()  # kill -9: no chance to release
        proc.communicate()
    assert _holder_record(run)["pid"] == proc.pid
    resumed = _train(run, nanogpt_cache, "--ckpt_path", "last", max_steps=first_step(run) + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if "took over the lock" in line]
    assert len(notes) == 1 and f"PID {proc.pid}" in notes[0], resumed.stderr[-3000:]
    assert not (run / LOCK_NAME).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "two-nodes"])
def test_a_ddp_run_takes_one_lock_on_rank_zero(nanogpt_cache, tmp_path, launcher):
    """2 CPU processes over gloo, started by Lightning's launcher, by torchrun, or as 2 nodes of one process each
    (NODE_RANK 0 and 1 on this host, sharing the run dir as nodes share a network filesystem)."""
    run, out = tmp_path / "run", tmp_path / "probe"
    out.mkdir()
    probe = callback_config(tmp_path, "tests.training.test_runlock.LockProbe", out=str(out))
    args = [*ARGS, "--trainer.max_steps", "6", "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp", "--config", str(probe)]
    env = {**os.environ, **_env(nanogpt_cache)}
    train_py = str(REPO / "train.py")
    if launcher == "two-nodes":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        logs = [open(tmp_path / f"node{n}.log", "w+") for n in (0, 1)]
        procs = [subprocess.Popen([sys.executable, train_py, *args, "--trainer.num_nodes", "2", "--trainer.devices", "1"],
                                  cwd=tmp_path, env={**env, "NODE_RANK": str(n)}, stdout=logs[n], stderr=logs[n])
                 for n in (0, 1)]
        codes = [p.wait(timeout=600) for p in procs]
        stderr = "".join(log.seek(0) or log.read() for log in logs)
        assert codes == [0, 0], stderr[-3000:]
    else:
        command = [train_py, *args, "--trainer.devices", "2"]
        if launcher == "torchrun":
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
        result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        stderr = result.stderr
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    for record in ranks:  # both ranks saw one lock, rank 0's, held while they trained
        assert record["lock"]["pid"] == ranks[0]["pid"], ranks
    assert not (run / LOCK_NAME).exists()
    assert "took over" not in stderr and "in use by" not in stderr


@pytest.mark.slow
def test_train_py_prints_no_lightning_advertisement(tmp_path, nanogpt_cache):
    result = _train(tmp_path / "run", nanogpt_cache, max_steps=1)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "GPU available" in output  # Lightning's own start-up lines still come through the same logger
    assert "litlogger" not in output and "litmodels" not in output and "Tip:" not in output, output
