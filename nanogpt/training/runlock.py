"""One run per run dir: a lock file, RUN/run.lock, naming the host, PID and start time of the run that holds it.

The holder keeps an flock on the file for as long as it runs, so the kernel frees it the moment the process
ends, however it ends (kill -9 included); the file itself is deleted on every ordinary exit. A start that finds
the file:
- flock held: a live run holds the dir -> refused, naming it;
- flock free, written by this host and its PID is gone (kill -9, power loss): taken over, saying so;
- flock free, written by another host: refused, with how to delete the file when that run is known to be dead
  (an flock may not reach across hosts on a network filesystem, so another host's lock is never taken silently);
  except by a later start of the same launcher job (SLURM requeues a job, torchrun restarts its group, only once
  the earlier start's processes are gone, and the next start may land on another node): taken over, saying so.
Only global rank 0 takes the lock: the other processes of a DDP or multi-node run share the dir with it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from nanogpt.errors import NanoGPTError

LOCK_NAME = "run.lock"
# Set by torchrun (RANK, LOCAL_RANK, GROUP_RANK), Lightning's DDP launcher (LOCAL_RANK and NODE_RANK for the
# processes it starts), SLURM and LSF. Lightning's rank_zero_only.rank reads RANK, LOCAL_RANK, SLURM_PROCID and
# JSM_NAMESPACE_RANK only, so it calls the first process of node 1 of a Lightning-launched multi-node run rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# a launcher's job id, constant across its restarts, and the count of those restarts
JOB_VARIABLES = (("SLURM_JOB_ID", "SLURM_RESTART_COUNT"), ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"))


def launcher_job(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """{"job": "SLURM_JOB_ID=N", "restart": count} under a launcher that restarts jobs, else {}."""
    for job, count in JOB_VARIABLES:
        if environ.get(job):
            restart = environ.get(count, "0").strip()
            return {"job": f"{job}={environ[job]}", "restart": int(restart) if restart.isdigit() else 0}
    return {}


def is_global_rank_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process will be global rank 0, known before the Trainer launches: no rank variable is non-zero.

    Errs towards "not rank 0": a rank variable set to anything but 0 means another process leads the run.
    """
    return all(environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "its details are not written yet"
    return f"host {holder.get('host')}, PID {holder.get('pid')}, since {holder.get('started')}"


class RunLock:
    """The lock of one run dir: acquire() takes it or raises NanoGPTError; release() gives it back (idempotent).

    Also a context manager. log receives the one line said when a stale lock is taken over.
    """

    def __init__(self, run_dir: os.PathLike | str, log: Optional[Callable[[str], None]] = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self._fd: Optional[int] = None
        self._created_dir = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _open_locked(self) -> tuple[int, bool]:
        """Opens the lock file and tries its flock: (fd, whether the flock is ours, or flock is unsupported)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fd, False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                return fd, True  # no flock on this filesystem: the written holder alone decides
            # the holder may have deleted the file between our open and our flock: then this inode is no lock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            try:
                self.run_dir.mkdir(parents=True)
                self._created_dir = True
            except FileExistsError:  # an existing run dir (or one a racing start just made)
                pass
            fd, ours = self._open_locked()
        except OSError as e:
            raise NanoGPTError(
                f"cannot create the lock file {self.path} ({e.strerror or e}); make the run dir writable, "
                "or choose another --trainer.default_root_dir"
            ) from None
        try:
            holder = self._read(fd)
            self._check(holder, ours)
            record = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"), **launcher_job()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # never ours, or not yet written: the file stays as it was
            self._remove_created_dir()
            raise
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> Optional[dict[str, Any]]:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) else None

    def _check(self, holder: Optional[dict[str, Any]], flock_free: bool) -> None:
        """Raises unless the lock may be taken: free and unwritten, or left behind by a dead run of this host."""
        wait = "wait for it to finish, or start this run in another --trainer.default_root_dir"
        if not flock_free:
            raise NanoGPTError(f"run dir {self.run_dir} is in use by another run ({_describe(holder)}): {wait}")
        if holder is None:
            return
        remove = f"if you know that run is dead, delete {self.path} and start again"
        if holder.get("host") != socket.gethostname():
            job = launcher_job()
            if job and holder.get("job") == job["job"] and isinstance(holder.get("restart"), int) \
                    and holder["restart"] < job["restart"]:
                self.log(f"note: took over the lock of run dir {self.run_dir} from an earlier start of this job "
                         f"({job['job']}, {_describe(holder)}), which its launcher has restarted since")
                return
            raise NanoGPTError(f"run dir {self.run_dir} is locked by a run on another host ({_describe(holder)}): "
                               f"{wait}; {remove}")
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            # the flock is free, yet the PID runs: a filesystem without flock, or the PID reused after a reboot
            raise NanoGPTError(f"run dir {self.run_dir} is locked by PID {pid}, which is running ({_describe(holder)}): "
                               f"{wait}; {remove}")
        self.log(f"note: took over the lock of run dir {self.run_dir} from a run that ended without releasing it "
                 f"({_describe(holder)}; killed or power lost)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # before the flock goes, so no start sees a free flock on our written file
        except OSError:
            pass  # the run dir is gone or unwritable: the flock still ends with the close below
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        # a start refused before writing anything leaves no empty run dir behind
        if self._created_dir:
            self._created_dir = False
            try:
                self.run_dir.rmdir()
            except OSError:
                pass  # not empty: the run wrote there
