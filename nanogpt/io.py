"""Checkpoints that survive crashes and never run code: atomic writes, safe validated reads, resume checks.

A checkpoint is written to a temporary file beside its target, flushed and fsynced, then renamed over the
target (and the directory fsynced), so a crash mid-write leaves the previous good file in place. Reading uses
torch.load(weights_only=True): plain tensors and data only, never a class or function named in the file.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

import torch

from nanogpt.errors import NanoGPTError, StorageError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizers.char import Tokenizer, tokenizer_from_dict

# Step checkpoints are named step-<global step>.ckpt, zero padded so they sort by step. STEP_FILENAME is the name
# as a template without the suffix: ModelCheckpoint's filename takes it as it is and adds .ckpt.
STEP_PREFIX = "step-"
STEP_FILENAME = STEP_PREFIX + "{step:08d}"
STEP_CHECKPOINT = re.compile(rf"^{re.escape(STEP_PREFIX)}(\d+)\.ckpt$")


def step_checkpoint_name(step: int) -> str:
    return STEP_FILENAME.format(step=step) + ".ckpt"


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in directory durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[int, str]:
    # hidden and not *.ckpt: a leftover temp file is never taken for a checkpoint
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the checkpoint the permissions open() would
    return fd, tmp


@contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """A temp file beside path, as (open fd, name), for the block to fill: renamed over path when the block ends (and
    the directory fsynced), removed if it raises. The fd is the block's to close."""
    fd, tmp = _temp_beside(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], Any]) -> None:
    """Calls write(file) on a temp file in path's directory, flushes and fsyncs it, then renames it over path.

    Readers see the old content or the new, never half a file, and a crash mid-write leaves the old one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_link(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """Makes dst a durable copy of src without rewriting it: a hard link where the filesystem has them, else a copy.

    Both ways go through a temp file and a rename, so dst is always either its old or its new content.
    """
    src, dst = Path(src), Path(dst)
    with _replacing(dst) as (fd, tmp):
        os.close(fd)
        os.unlink(tmp)  # the name only: the link (or copy) takes its place
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def remove_stale_temp_files(directory: Union[str, Path]) -> list[Path]:
    """Deletes temp files a killed writer left in a checkpoint dir; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.ckpt.*.tmp")) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def safe_load(path: Union[str, Path], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True): never runs code; an unreadable, empty, damaged or unsafe file is a NanoGPTError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise NanoGPTError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise NanoGPTError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise NanoGPTError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, which could run code "
            f"({first[:160]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other unpickler failure (IndexError, EOFError, ...) is a damaged file
        if mmap:
            # mmap reads only torch's zip format, and says little about why it failed: a full read tells an older
            # format (which loads), an unsafe pickle (refused) and a damaged file (corrupt) apart
            return safe_load(path, map_location, mmap=False)
        raise NanoGPTError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(e).__name__})"
        ) from None
    return ckpt


def read_checkpoint(path: Union[str, Path], map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Loads a training checkpoint safely; any unreadable, unsafe or foreign file is a NanoGPTError naming it."""
    ckpt = safe_load(path, map_location, mmap)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise NanoGPTError(f"{path} is not a nanogpt training checkpoint (no state_dict and global_step)")
    return ckpt


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in state_dict holding NaN or inf."""
    return [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def check_resumable(path: Union[str, Path]) -> dict[str, Any]:
    """read_checkpoint plus the checks resuming needs: finite weights and a training state to continue.

    Memory-mapped: only the weights are read (the optimizer state, two thirds of the file, stays on disk until
    Lightning loads the checkpoint for real), so checking costs a fraction of a second load.
    """
    ckpt = read_checkpoint(path, mmap=True)
    bad = non_finite_tensors(ckpt["state_dict"])
    if bad:
        raise NanoGPTError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); resume from another")
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise NanoGPTError(f"checkpoint {path} holds weights only (no optimizer or loop state) and cannot be resumed")
    return ckpt


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint file, or a run dir's best checkpoint (else its last)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "best.ckpt", p / "checkpoints" / "last.ckpt", p / "best.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise NanoGPTError(f"run dir {path} holds no checkpoints/best.ckpt or checkpoints/last.ckpt; train it first")
    if not p.is_file():
        raise NanoGPTError(f"checkpoint {path} does not exist; pass a .ckpt file or a run dir")
    return p


def step_checkpoints(ckpt_dir: Union[str, Path]) -> list[Path]:
    """A run's step-N.ckpt files, newest step first."""
    ckpt_dir = Path(ckpt_dir)
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob(f"{STEP_PREFIX}*.ckpt") if (m := STEP_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def pick_resume_checkpoint(ckpt_dir: Union[str, Path], log=None) -> Path:
    """The checkpoint `--ckpt_path last` resumes: last.ckpt, else the newest readable step checkpoint.

    Never silently starts from scratch: if the dir holds checkpoints and none can be resumed, this raises an
    error naming each file and why; if an older one is used instead of last.ckpt, it says which (through log).
    """
    ckpt_dir = Path(ckpt_dir)
    log = log or (lambda message: print(message, file=sys.stderr))
    last = ckpt_dir / "last.ckpt"
    candidates = ([last] if last.exists() else []) + step_checkpoints(ckpt_dir)
    if not candidates:
        others = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        hint = f" (it holds only {', '.join(others)}: pass one with --ckpt_path FILE)" if others else ""
        raise NanoGPTError(
            f"--ckpt_path last: there is no {last} to resume{hint}; drop --ckpt_path to start a new run"
        )
    problems: list[str] = []
    for path in candidates:
        try:
            ckpt = check_resumable(path)
        except NanoGPTError as e:
            problems.append(str(e))
            continue
        if problems:
            log(
                f"warning: {'; '.join(problems)}. Resuming from the newest good checkpoint, {path} "
                f"(step {ckpt['global_step']}), instead"
            )
        return path
    raise NanoGPTError(
        f"--ckpt_path last: no checkpoint in {ckpt_dir} can be resumed: {'; '.join(problems)}. "
        "Resume from another file with --ckpt_path FILE, or start a new run in another --trainer.default_root_dir"
    )


# What a failed write into the run dir can say about the storage, and what the user does about it.
_NO_SPACE = "free some space (or move the run dir to a larger disk)"
STORAGE_FIXES = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: "raise the file size limit (ulimit -f) or move the run dir to a filesystem that takes larger files",
    errno.EROFS: "make the run dir writable (or move it)",
    errno.EACCES: "make the run dir writable (or move it)",
    errno.EPERM: "make the run dir writable (or move it)",
    errno.ENOENT: "restore or remount the run dir (it was deleted, moved or unmounted while the run wrote to it)",
    errno.ESTALE: "remount the run dir (its network filesystem dropped it)",
    errno.ENOTDIR: "restore the run dir (part of its path was replaced while the run wrote to it)",
}


def storage_failure(exc: BaseException) -> Optional[OSError]:
    """The OSError of a failed write to storage in exc or what caused it (torch.save wraps it in a RuntimeError,
    loggers in a ValueError), or None when exc is something else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_FIXES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:  # tied weights share one storage, written once
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def storage_error(error: OSError, target: Union[str, Path, None], ckpt_dir: Union[str, Path, None],
                  size: Optional[int] = None) -> StorageError:
    """The one-line error for a failed write: what failed, the newest intact checkpoint in ckpt_dir, what to do."""
    what = f"could not write {os.fsdecode(target)}" if target else "could not write to the run dir"
    if size:
        what += f" (it needs about {size / 1e6:.1f} MB)"
    what += f": {error.strerror or error}"
    safe, then = "", "rerun with --ckpt_path last"
    if ckpt_dir is not None:
        try:
            newest = pick_resume_checkpoint(ckpt_dir, log=lambda message: None)
            safe = f"; {newest} (step {read_checkpoint(newest, mmap=True)['global_step']}) is intact"
        except NanoGPTError:
            safe, then = f"; no complete checkpoint is in {ckpt_dir}", "start the run again"
    return StorageError(f"{what}{safe}. To continue, {STORAGE_FIXES[error.errno]}, then {then}")


def load_checkpoint(path: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Builds the model and tokenizer stored in a checkpoint (file or run dir), in eval mode on device.

    Loading never runs code from the file: torch.load(weights_only=True) takes plain data only.
    """
    file = resolve_checkpoint(path)
    ckpt = safe_load(file, map_location=device, mmap=True)  # an unsafe or damaged file: one error naming it
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "tokenizer" not in ckpt:
        raise NanoGPTError(f"{file} is not a nanogpt checkpoint (no state_dict and tokenizer); pass one written by train.py")
    config = GPTConfig.from_dict(ckpt.get("hyper_parameters", {}))
    model = GPT(config)
    # the LightningModule keeps the network as `model`: drop that prefix (and compile's, if any)
    state = {k.removeprefix("model.").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"])
