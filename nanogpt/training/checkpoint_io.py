"""How a run's checkpoint files are written: once per save, atomically, the other names hard links, in the background.

At one moment of a run several files want the same state: at a validation best.ckpt, step-N.ckpt and last.ckpt.
RunCheckpointIO gathers the names asked for at one save point (one global step) and, when the point is committed,
hands one checkpoint to AtomicCheckpointIO, which writes it once (temp file, fsync, rename) and makes every other
name a hard link to that file (a copy where the file system has no hard links), each through a temp name and a
rename. Pruning an old step file then deletes a name, never data another name still holds. Every file is an
ordinary checkpoint that torch.load reads on its own, and `cp -r` (which copies links as files) keeps the run
resumable.

With async_save the step waits only while the state is copied to host memory (HostStager, into buffers kept from
the previous save); serialising, fsync, links and renames run in a background thread. At most one save is in
flight: the next commit waits for it, and so does teardown, which Lightning runs when fit ends, on an error and on
Ctrl-C, so a save is finished (or, on Ctrl-C, abandoned with its temp file removed) before the process goes on. A
background write that fails raises its StorageError in the training thread at the next commit or at teardown.
Lightning's AsyncCheckpointIO does the same with a fresh clone of every tensor per save, on the tensor's device: on
a GPU a second copy of the state in device memory for as long as the write takes, tied weights written twice, and
no bound on saves queued behind one another; torch.distributed.checkpoint.async_save writes a directory of shards,
not a file torch.load reads. benchmarks/checkpoint_speed.py measures the clone beside the staging.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import CheckpointIO

from nanogpt.io import atomic_link, atomic_write, read_checkpoint, storage_error, storage_failure, tensor_bytes


class SaveCancelled(Exception):
    """A background write given up on Ctrl-C: its temp file is gone and the files it would have replaced are intact."""


@dataclass(frozen=True)
class SaveNames:
    """AtomicCheckpointIO's storage_options: the names that get the file just written, and names to delete after."""

    links: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


class _Cancellable:
    """A file torch.save writes through, that stops the write at its next chunk once `cancelled` is set."""

    def __init__(self, file: BinaryIO, cancelled: threading.Event) -> None:
        self.file, self.cancelled = file, cancelled

    def write(self, data: Any) -> int:
        if self.cancelled.is_set():
            raise SaveCancelled()
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing atomically in the target's own directory and reading safely.

    storage_options may be a SaveNames: the file is written once and then linked under each of `links`, and the
    names in `remove` are deleted (names only: data another name holds stays).
    A write that fails for lack of space, a file size limit, a read-only or vanished run dir is a StorageError
    naming the file, its size and the newest intact checkpoint; its temp file is gone, the older files untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._written_dirs: set[Path] = set()  # dirs this run saved into: never silently created again
        self.cancelled = threading.Event()  # set on Ctrl-C: a write in progress stops, its temp file removed

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None and not isinstance(storage_options, SaveNames):
            raise TypeError(f"{type(self).__name__} takes SaveNames as storage_options, got {storage_options!r}")
        names = storage_options or SaveNames()
        path = Path(path)
        target = path
        try:
            if path.parent in self._written_dirs and not path.parent.is_dir():
                # deleted or unmounted under the run: recreating it would scatter the run over two places
                raise FileNotFoundError(errno.ENOENT, "the directory is gone", str(path.parent))
            atomic_write(path, lambda f: torch.save(checkpoint, _Cancellable(f, self.cancelled)))
            self._written_dirs.add(path.parent)
            for link in names.links:
                target = Path(link)
                if target != path:
                    atomic_link(path, target)
            for name in names.remove:
                if name not in names.links and Path(name) != path:
                    Path(name).unlink(missing_ok=True)
        except Exception as e:
            failure = storage_failure(e)
            if failure is None:
                raise
            raise storage_error(failure, target, path.parent, tensor_bytes(checkpoint, set())) from None

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return read_checkpoint(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class HostStager:
    """Copies a checkpoint's tensors into host buffers kept from its previous save: the snapshot an asynchronous
    write serialises while training changes the live tensors.

    Reused buffers spare an allocation (and, from a GPU, a pinning) per save. From a GPU the buffers are pinned and
    the copies asynchronous, waited for once at the end: the step waits for the state to reach host memory only.
    Tensors sharing memory (tied weights) share one buffer, written once. Non-tensor values are taken as they are:
    Lightning builds a new checkpoint dict for every save.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}  # by the tensor's place in the checkpoint

    def stage(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        buffers: dict[tuple, torch.Tensor] = {}
        shared: dict[tuple, torch.Tensor] = {}  # this save's copies, by the memory they copy
        from_device = False

        def copy(obj: Any, where: tuple) -> Any:
            nonlocal from_device
            if isinstance(obj, torch.Tensor):
                memory = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape,
                          obj.stride(), obj.dtype)
                if memory in shared:
                    return shared[memory]
                buffer = self._buffers.get(where)
                if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                    buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                buffer.copy_(obj.detach(), non_blocking=obj.is_cuda)
                from_device = from_device or obj.is_cuda
                buffers[where] = shared[memory] = buffer
                return buffer
            if isinstance(obj, dict):
                return {k: copy(v, (*where, k)) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v, (*where, i)) for i, v in enumerate(obj))
            return obj

        # a copy is memory-bound: one thread copies about as fast as two, and never waits on a descheduled OpenMP
        # thread, which on a busy CPU made the copies 5 to 20x slower (benchmarks/RESULTS.md)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            staged = copy(checkpoint, ())
        finally:
            torch.set_num_threads(threads)
        if from_device:
            torch.cuda.synchronize()  # the copies are done before the writer reads them
        self._buffers = buffers
        return staged


@dataclass
class _SavePoint:
    step: Any
    checkpoint: dict[str, Any]
    names: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


class RunCheckpointIO(CheckpointIO):
    """The run's checkpoint IO: one write per save point, the other names linked to it, in the background when
    async_save.

    A save point is the names asked for at one global step; commit() writes it (LastCheckpoint commits after
    writing last.ckpt, the last name of every save point), as does a save asked for at another step, and teardown.
    """

    def __init__(self, async_save: bool = True) -> None:
        super().__init__()
        self.async_save = async_save
        self.files = AtomicCheckpointIO()
        self._stager = HostStager()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._in_flight: Optional[Future] = None
        self._pending: Optional[_SavePoint] = None
        self._committed: tuple[Any, tuple[str, ...]] = (None, ())  # the step and names of the last commit

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        step = checkpoint.get("global_step")
        if self._pending is not None and self._pending.step != step:
            self.commit()
        if self._pending is None:
            self._pending = _SavePoint(step, checkpoint)
        # the newest dict: the callbacks that judged this step before have updated their state in it
        self._pending.checkpoint = checkpoint
        name = str(path)
        if name in self._pending.names:
            self._pending.names.remove(name)
        self._pending.names.append(name)

    def remove_checkpoint(self, path: Any) -> None:
        if self._pending is not None:
            self._pending.remove.append(str(path))  # after the point's file exists: pruning never leaves fewer
        else:
            self.wait()
            self.files.remove_checkpoint(path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return self.files.load_checkpoint(path, map_location, weights_only)

    def commit(self, wait: bool = False) -> None:
        """Writes the gathered save point: once, to its last name (the newest state is resumable as soon as it is
        written), the other names linked to it. wait=True: in this thread, finished on return."""
        point, self._pending = self._pending, None
        if point is None:
            if wait:
                self.wait()
            return
        self.wait()  # at most one save in flight
        step, before = self._committed
        if step == point.step:
            # a second save of the same step (a validation after the every-N-steps save, a signal's): the names of
            # the first now get the newer state too, so the step's first file is not kept beside it
            point.names[:0] = [n for n in before if n not in point.names and n not in point.remove]
        self._committed = (point.step, tuple(point.names))
        *links, path = point.names
        names = SaveNames(tuple(links), tuple(point.remove))
        if wait or not self.async_save:
            self.files.save_checkpoint(point.checkpoint, path, storage_options=names)
            return
        staged = self._stager.stage(point.checkpoint)  # the only part the training step waits for
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._in_flight = self._executor.submit(self.files.save_checkpoint, staged, path, storage_options=names)

    def wait(self) -> None:
        """Returns once no save is in flight; raises the StorageError of one that failed. Ctrl-C while waiting
        gives the write up (its temp file removed, the older files intact) and is raised again."""
        if self._in_flight is None:
            return
        try:
            self._in_flight.result()
        except SaveCancelled:
            pass
        except KeyboardInterrupt:
            self.cancel()
            raise
        finally:
            self._in_flight = None

    def cancel(self) -> None:
        """Ctrl-C: drops a save point not yet written and stops the write in flight at its next chunk."""
        self._pending = None
        self.files.cancelled.set()
        future, self._in_flight = self._in_flight, None
        if future is not None:
            wait_for([future])  # moments: the writer stops at its next chunk and removes its temp file

    def discard(self) -> None:
        """After an error mid save point: the names gathered so far are not written (the state that failed is not
        saved); a save in flight, of an earlier point, is still finished by teardown."""
        self._pending = None

    def teardown(self) -> None:
        """End of fit, an error or Ctrl-C (Lightning calls it after on_exception): the save in flight is finished."""
        try:
            self.commit()
            self.wait()
        finally:
            self._stager = HostStager()  # the staging buffers, as large as the state, are let go
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
