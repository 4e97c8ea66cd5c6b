"""Every use of Lightning's private API in nanogpt, in one place, with the Lightning releases it was tested on.

Each one buys something no public API gives:
- ddp_kwargs: the DistributedDataParallel settings of a DDPStrategy that Lightning built from a name ("ddp",
  "auto"), so a run gets nanogpt's defaults (no unused-parameter search, gradient buckets as views) however
  the strategy was chosen.
- silence_sigterm_broadcast: Lightning (2.5 on) broadcasts its SIGTERM flag from rank 0 before every micro-step
  and reads it back with .item(), a host-device sync per step on GPUs (Lightning issue #21487). FaultTolerance
  handles SIGTERM itself (an asynchronous vote on a side gloo group) while training runs, so the broadcast
  carries nothing then and is switched off.
- leaves_gradients_scaled: under fp16 (a GradScaler), Lightning unscales the gradients before clipping only for
  optimizers that do not unscale inside their own step (a fused AdamW does); GPTModule clips by the true norm, so
  it unscales them itself exactly when Lightning did not.
tests/test_private.py fails on a Lightning release not in TESTED_LIGHTNING_VERSIONS: test these
again, then add it (setup.cfg keeps lightning below the next minor release meanwhile).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning

TESTED_LIGHTNING_VERSIONS = ("2.6.6",)


def is_tested_lightning(version: str = lightning.__version__) -> bool:
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
