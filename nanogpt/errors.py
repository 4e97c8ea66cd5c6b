"""The exception types for mistakes a user can make (bad input, config, data or checkpoint) and for a run dir that
cannot be written (disk full, read-only, gone); and the argument parser of the entry points that report a bad flag
the same way."""

import argparse
import os
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterator, NoReturn


class NanoGPTError(Exception):
    """A user-facing error: its message is one line that says what was wrong, where and how to fix it.

    Entry points print it as ``error: <message>`` and exit with exit_code, without a traceback.
    """

    exit_code = 2


class StorageError(NanoGPTError):
    """Writing to the run dir failed (no space, a file size limit, read-only, the dir gone): what failed, what is
    safe and what to do, in one line. Exit code 3, so job scripts can tell it from a mistake in the command."""

    exit_code = 3


class StoppedWithAnotherRank(NanoGPTError):
    """This process stops because another rank of the run found an error and reports it: exit_with prints
    nothing here, so a multi-process run shows the error once, from the rank that saw it."""


# what Lightning warns on any machine with srun on the PATH (every SLURM login node), even outside a job
SRUN_HINT = r".*The `srun` command is available on your system but is not used.*"


def under_slurm(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs inside a SLURM job (a batch script, srun, salloc)."""
    return "SLURM_JOB_ID" in environ


def hide_srun_hint(environ: Mapping[str, str] = os.environ) -> None:
    """Drops Lightning's "srun is available but not used" hint outside SLURM jobs, where it is noise (entry points
    call it); inside a job that forgot srun the hint is kept, since there it is right."""
    if not under_slurm(environ):
        warnings.filterwarnings("ignore", message=SRUN_HINT)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): libraries' messages can span many lines."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def exit_with(e: NanoGPTError) -> NoReturn:
    """Prints ``error: <message>`` to stderr and exits with the error's exit code: an entry point's last word."""
    if not isinstance(e, StoppedWithAnotherRank):
        print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Ends the process with exit_with on a NanoGPTError raised inside (the entry points' main)."""
    try:
        yield
    except NanoGPTError as e:
        exit_with(e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes (an unknown flag, a bad choice) are one ``error: ...`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
