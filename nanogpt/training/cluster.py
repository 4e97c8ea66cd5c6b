"""Runs that a scheduler stops and starts again: SLURM requeues, SLURM time limits, torchrun elastic restarts.

One mechanism for all of them: the run dir's own checkpoints, resumed with `--ckpt_path auto`.
- SIGUSR1 (`#SBATCH --signal=B:USR1@120`, SLURM's warning before a time limit): every rank stops after the same
  step, last.ckpt is written, and global rank 0 requeues the job (`scontrol requeue`) once its files are safe.
- SIGTERM (`scancel`, a preemption) and SIGINT: the same stop and checkpoint, and no requeue.
- A restart (a requeued job, torchrun's next attempt) runs the same command again; `--ckpt_path auto` resumes the
  newest intact checkpoint, or starts fresh when the run dir holds none.
Lightning's own SLURM auto-requeue (its SIGUSR1 handler writing hpc_ckpt_N.ckpt files) is switched off, so no
second kind of checkpoint file exists. A restart without `--ckpt_path` is still refused: see restart_hint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional

from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

from nanogpt.errors import under_slurm
from nanogpt.training.runlock import is_global_rank_zero

# set by the launcher on a restarted job: SLURM counts requeues, torchrun its restarts of the worker group
RESTART_VARIABLES = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def restart_of(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The launcher's mark of a restarted job, as "NAME=N" (N > 0), or None for a first start."""
    for name in RESTART_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return f"{name}={value}"
    return None


def restart_hint(environ: Mapping[str, str] = os.environ) -> str:
    """What to add to the refusal of a restarted job: the job's command needs --ckpt_path auto.

    A restart does not imply auto: a job whose first start was refused (its run dir held another run's
    checkpoints) would be restarted by torchrun and then silently continue that other run.
    """
    restart = restart_of(environ)
    if restart is None:
        return ""
    return (f" (this is a restarted job, {restart}: put --ckpt_path auto in the job's command, so that every "
            "start resumes the newest checkpoint or starts fresh)")


def requeue_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The id `scontrol requeue` takes for this job: ARRAYJOB_TASK for a task of a job array, else the job id."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_job(environ: Mapping[str, str] = os.environ, log: Optional[Callable[[str], None]] = None) -> bool:
    """Puts this SLURM job back in the queue (`scontrol requeue`), from global rank 0 only; True if it did.

    Call after the checkpoint is written and the run dir's lock released: SLURM ends the job's processes as it
    requeues it, so this is the last thing the process does.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    job = requeue_id(environ)
    if job is None or not is_global_rank_zero(environ):
        return False
    # the requeue sends SIGTERM to this very job: let it find the command done and the process leaving
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"warning: could not requeue SLURM job {job} (scontrol: {e}); the checkpoint is saved: resubmit the "
            "job to resume it")
        return False
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit {result.returncode}"
        log(f"warning: scontrol requeue {job} failed ({why}); the checkpoint is saved: resubmit the job "
            "(its --ckpt_path auto resumes it)")
        return False
    log(f"requeued SLURM job {job}: it starts again and resumes from the checkpoint (--ckpt_path auto)")
    return True


def one_checkpoint_mechanism(plugins: list[Any], environ: Mapping[str, str] = os.environ) -> list[Any]:
    """The Trainer's plugins with Lightning's SLURM auto-requeue off: nanogpt's SIGUSR1 handling takes its place.

    Lightning's would write hpc_ckpt_N.ckpt at the run dir's root and requeue the job itself, a second kind of
    checkpoint that --ckpt_path auto does not know. A SLURMEnvironment given in the config is kept, requeue off.
    """
    plugins = list(plugins)
    given = [p for p in plugins if isinstance(p, ClusterEnvironment)]
    for plugin in given:
        if isinstance(plugin, SLURMEnvironment):
            plugin.auto_requeue = False
    if not given and under_slurm(environ) and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def stop_signals() -> tuple[int, ...]:
    """The signals that stop training with a checkpoint: SIGTERM, SIGINT, and SIGUSR1 where the OS has it."""
    return tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


def wants_requeue(signum: int) -> bool:
    return signum == getattr(signal, "SIGUSR1", None)
