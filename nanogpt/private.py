"""Every use of another library's private API in nanogpt, in one place, with the releases it was tested on.

Each one buys something no public API gives:
- ddp_kwargs (Lightning): the DistributedDataParallel settings of a DDPStrategy that Lightning built from a name
  ("ddp", "auto"), so a run gets nanogpt's defaults (no unused-parameter search, gradient buckets as views)
  however the strategy was chosen.
- silence_sigterm_broadcast (Lightning): Lightning (2.5 on) broadcasts its SIGTERM flag from rank 0 before every
  micro-step and reads it back with .item(), a host-device sync per step on GPUs (Lightning issue #21487).
  FaultTolerance handles SIGTERM itself (an asynchronous vote on a side gloo group) while training runs, so the
  broadcast carries nothing then and is switched off.
- leaves_gradients_scaled (Lightning): under fp16 (a GradScaler), Lightning unscales the gradients before clipping
  only for optimizers that do not unscale inside their own step (a fused AdamW does); GPTModule clips by the true
  norm, so it unscales them itself exactly when Lightning did not.
- memmap_buffer (numpy): the mmap.mmap under an np.memmap, to tell the kernel that the token cache is read at
  random places (no readahead); numpy has no public way to reach it.
- dataset_fingerprint (datasets): what identifies a Dataset's content, so a changed dataset re-encodes the token
  cache; public API has none that is cheap.
- text_pb (TensorBoard): a text summary under the tag as given (SummaryWriter.add_text appends "/text_summary").

Nothing here imports a library at import time: the bottom layers (the token cache, sampling) import this module
without Lightning. tests/test_private.py fails on a release not in the TESTED_* lists: test the uses again, then
add it (setup.cfg keeps lightning below the next minor release meanwhile).
"""

from __future__ import annotations

import mmap
from typing import Any, Callable, Optional

TESTED_LIGHTNING_VERSIONS = ("2.6.6",)
TESTED_NUMPY_VERSIONS = ("2.4.6",)
TESTED_DATASETS_VERSIONS = ("5.2.0",)
TESTED_TENSORBOARD_VERSIONS = ("2.21.0",)


def is_tested_lightning(version: Optional[str] = None) -> bool:
    """Whether version (default: the installed Lightning's) is one the Lightning uses here were tested on."""
    if version is None:
        import lightning

        version = lightning.__version__
    return version in TESTED_LIGHTNING_VERSIONS


def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The kwargs a DDPStrategy passes to DistributedDataParallel when fit wraps the model (editable until then)."""
    return strategy._ddp_kwargs


def silence_sigterm_broadcast(trainer: Any) -> Callable[[], None]:
    """Switches off the training loop's per-step SIGTERM broadcast; returns the function that switches it back on.

    Call only while handlers of your own replace Lightning's SIGTERM handler (its flag stays False meanwhile).
    """
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):  # a release without the broadcast
        return lambda: None
    loop._broadcast_sigterm_tensor = lambda: None
    return lambda: vars(loop).pop("_broadcast_sigterm_tensor", None)  # the class's method again


def leaves_gradients_scaled(optimizer: Any) -> bool:
    """Whether Lightning's MixedPrecision skips GradScaler.unscale_ before clipping, for this optimizer."""
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    return _optimizer_handles_unscaling(optimizer)


def memmap_buffer(array: Any) -> Optional[mmap.mmap]:
    """The mmap.mmap under an np.memmap (numpy's _mmap), or None where there is none (an empty or copied array)."""
    return getattr(array, "_mmap", None)


def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint `datasets` keeps of a Dataset's content (its _fingerprint): it changes when the data does."""
    return dataset._fingerprint


def text_pb(tag: str, data: Any, description: Optional[str] = None) -> Any:
    """TensorBoard's text summary protobuf under exactly tag (its summary_v2.text_pb, not exported publicly)."""
    from tensorboard.plugins.text.summary_v2 import text_pb as make

    return make(tag, data, description)
