"""A real one-node SLURM cluster on this host for the tests: munged, slurmctld and slurmd from the Debian packages
(slurmd slurmctld slurm-client munge), with every file, port and socket of their own in a temp dir.

`.ci/run` installs the packages; where they are missing (and cannot be installed) the tests that need the cluster
skip, saying why. The daemons run as root, as SLURM's compute daemon must.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
# seconds a requeued job waits before it may start again (SLURM's cred_expire; 120 by default): short for tests
REQUEUE_WAIT = 5

CONF = """\
ClusterName=nanogpt-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={requeue_wait}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, one node with the machine's CPUs, jobs requeueable (JobRequeue=1).

    env: the environment for SLURM's commands (SLURM_CONF names this cluster's config).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # munged refuses a key or socket in a dir others can write
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        (root / "plugstack.conf").write_text("")
        (root / "slurm.conf").write_text(CONF.format(
            host=self.host, root=root, cpus=os.cpu_count() or 1, ctld_port=_free_port(), slurmd_port=_free_port(),
            requeue_wait=REQUEUE_WAIT))
        munge = root / "munge"
        self._spawn(["munged", "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                     f"--seed-file={munge}/munged.seed"])
        _wait(lambda: (munge / "munge.socket").exists(), "munged", 30)
        self._spawn(["slurmctld", "-D", "-i"])
        self._spawn(["slurmd", "-D"])
        _wait(self._node_idle, "the SLURM node to come up", 60)

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.root / f"{Path(argv[0]).name}.out", "ab")
        self._daemons.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def _node_idle(self) -> bool:
        for proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
        result = self.command("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.returncode == 0 and result.stdout.strip() in ("idle", "mixed", "allocated")

    def logs(self) -> str:
        texts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                texts.append(f"--- {name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(texts)

    def stop(self) -> None:
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._daemons):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons.clear()

    def command(self, *argv: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *argv: str, cwd: Path, env: Optional[dict] = None) -> str:
        """Submits a job as a user would (sbatch OPTIONS SCRIPT ARGS, in cwd); returns its id."""
        result = subprocess.run(["sbatch", "--parsable", *map(str, argv)], cwd=cwd, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol show job: its fields (JobState, Restarts, ExitCode, ...), or {} once SLURM forgot it."""
        result = self.command("scontrol", "-o", "show", "job", job_id, check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_for(self, job_id: str, condition, what: str, timeout: float = 300) -> dict[str, str]:
        state: dict[str, str] = {}

        def met() -> bool:
            nonlocal state
            state = self.job(job_id)
            return condition(state)

        try:
            _wait(met, f"job {job_id} {what} (last seen {state.get('JobState')})", timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.logs()}") from None
        return state

    def wait_done(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return self.wait_for(job_id, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                      "NODE_FAIL", "OUT_OF_MEMORY"),
                             "to end", timeout)
