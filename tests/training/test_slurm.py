"""Jobs on a real SLURM (one node on this host, tests/training/slurm_cluster.py) that SLURM stops and starts again.

Every job is `sbatch scripts/slurm/train.sbatch`, the shipped script, with CPU values for its parameters: 1 node,
2 tasks of DDP over gloo (or 1), no GPUs. Where SLURM is not installed these tests skip, saying so; `.ci/run`
installs it, so CI runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from nanogpt.io import check_resumable
from tests.conftest import REPO, TINY_CONFIG
from tests.training.restarts import (ARGS, MAX_STEPS, OFFLINE, assert_one_run_same_weights, callbacks, starts,
                                     wait_for)
from tests.training.slurm_cluster import REQUEUE_WAIT, SlurmCluster, missing_programs

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
FLAGS = ARGS[2:]  # ARGS without its --config: the script takes the config as its first argument
# the script's GPU values, for this CPU machine
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurmd slurmctld "
                    "slurm-client munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs as root, and these tests are not root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Job:
    """One submission of the shipped script: its id, run dir, output file (appended across restarts) and probe."""

    def __init__(self, slurm: SlurmCluster, work: Path, nanogpt_cache: Path, *sbatch: str, tasks: int = 2,
                 throttle: float = 0.3, extra: tuple = ()) -> None:
        self.slurm, self.run, self.out, self.probe = slurm, work / "run", work / "job.out", work / "starts.jsonl"
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
               "NANOGPT_CACHE": str(nanogpt_cache), **OFFLINE}
        self.id = slurm.sbatch(*CPU_JOB, f"--ntasks-per-node={tasks}", f"--output={self.out}", *sbatch, SCRIPT,
                               TINY_CONFIG, *FLAGS, "--trainer.default_root_dir", self.run,
                               *callbacks(self.probe, throttle), *extra, cwd=REPO, env=env)

    def running(self) -> bool:
        return self.slurm.job(self.id).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED")

    def wait_for_checkpoint(self, name: str = "step-00000010.ckpt") -> None:
        wait_for(self.run / "checkpoints" / name, self.running)

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def done(self, timeout: float = 400) -> dict[str, str]:
        state = self.slurm.wait_done(self.id, timeout)
        assert state["JobState"] == "COMPLETED", f"{state}\n{self.output()[-4000:]}"
        return state


def test_requeued_job_comes_back_by_itself_and_ends_bit_identical(slurm, uninterrupted_ddp, tmp_path, nanogpt_cache):
    """(a) scontrol requeue mid-run: the job stops checkpointed, comes back by itself, resumes through
    --ckpt_path auto and finishes with the weights of an uninterrupted run. (d) across the restart: one run dir,
    one TensorBoard run, run.lock released by the first start and taken by the second."""
    job = Job(slurm, tmp_path, nanogpt_cache)
    job.wait_for_checkpoint()
    slurm.command("scontrol", "requeue", job.id)
    state = job.done()
    assert state["Restarts"] == "1"
    output = job.output()
    assert "SIGTERM received: stopped after step" in output, output[-4000:]
    assert output.count(f"job {job.id} start") == 2  # --open-mode=append: both starts in one file
    assert_one_run_same_weights(uninterrupted_ddp, job.run)
    first, second = starts(job.probe)
    assert (first["restart"], second["restart"]) == (0, 1)
    assert first["step"] == 0 and second["step"] >= 10  # the second start resumed a checkpoint
    assert first["lock"]["pid"] == first["pid"] and second["lock"]["pid"] == second["pid"] != first["pid"]
    assert [(r["lock"]["job"], r["lock"]["restart"]) for r in (first, second)] == [(f"SLURM_JOB_ID={job.id}", 0),
                                                                                   (f"SLURM_JOB_ID={job.id}", 1)]
    assert "took over the lock" not in output  # the first start released it: nothing stale to take over
    assert sorted(p.name for p in job.run.iterdir() if not p.name.startswith("events.")) == [
        "checkpoints", "config.yaml", "hparams.yaml"]
    assert "SLURM auto-requeueing enabled" not in output  # Lightning's own requeue is off: one mechanism


def test_time_limit_signal_checkpoints_requeues_and_the_job_finishes(slurm, uninterrupted_ddp, tmp_path,
                                                                     nanogpt_cache):
    """(b) SLURM's warning before the time limit (--signal=B:USR1@N): the tasks stop checkpointed at the signal,
    rank 0 requeues the job (as a task of a job array: scontrol requeue ARRAYJOB_TASK), and the next start
    finishes it."""
    # SLURM checks its timers every 30 s and signals up to a minute early: with a 5-minute limit the warning is
    # minutes away; once training runs, the limit becomes 2 minutes, so the warning comes within 30 s, mid-run
    job = Job(slurm, tmp_path, nanogpt_cache, "--array=3", "--time=5:00", "--signal=B:USR1@60", throttle=3.0)
    wait_for(job.probe, job.running)
    slurm.command("scontrol", "update", f"JobId={job.id}", "TimeLimit=2")
    slurm.wait_for(job.id, lambda s: int(s.get("Restarts", 0)) >= 1, "to be requeued")
    slurm.command("scontrol", "update", f"JobId={job.id}", "TimeLimit=5")  # the next start has its minutes
    state = job.done()
    output = job.output()
    assert state["Restarts"] == "1", output[-4000:]
    stopped = re.findall(r"SIGUSR1 received: stopped after step (\d+), checkpoint saved", output)
    assert len(stopped) == 1, output[-4000:]  # both tasks stopped at one step, and rank 0 says it once
    assert f"requeued SLURM job {job.id}_3" in output
    first, second = starts(job.probe)
    assert first["step"] == 0 and second["step"] == int(stopped[0])  # resumed at the signal's checkpoint
    assert_one_run_same_weights(uninterrupted_ddp, job.run)


def test_scancel_stops_checkpointed_and_nothing_is_requeued(slurm, tmp_path, nanogpt_cache):
    """(c) a plain scancel (SIGTERM): the job stops after a step, that step checkpointed, and it stays cancelled."""
    job = Job(slurm, tmp_path, nanogpt_cache, tasks=1, throttle=0.5)
    job.wait_for_checkpoint()
    slurm.command("scancel", job.id)
    state = slurm.wait_done(job.id)
    time.sleep(REQUEUE_WAIT + 5)  # longer than a requeued job waits before it starts again
    state = slurm.job(job.id)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state
    output = job.output()
    assert "SIGTERM received: stopped after step" in output, output[-4000:]
    assert "requeued" not in output
    step = check_resumable(job.run / "checkpoints" / "last.ckpt")["global_step"]
    assert 10 <= step < MAX_STEPS
    assert not (job.run / "run.lock").exists()


def test_refused_start_says_why_once_and_is_not_requeued(slurm, tmp_path, nanogpt_cache, uninterrupted_ddp):
    """auto still refuses what resume refuses (here another model shape), once for the job, not once per task."""
    shutil.copytree(uninterrupted_ddp, tmp_path / "run")
    job = Job(slurm, tmp_path, nanogpt_cache, extra=("--model.n_layer", "3"))
    state = slurm.wait_done(job.id)
    output = job.output()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "n_layer" in errors[0], output[-4000:]
    assert "Traceback" not in output
