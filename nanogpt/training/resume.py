"""What a resumed run must keep: the model shape and the optimizer settings restored from the file, and every
RNG state, so that a resumed run continues exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPTConfig, marked
from nanogpt.training.optim import OptimizerSettings

# Fields of GPTModule that fix the shapes of the weights: a resumed run must match them exactly.
SHAPE_FIELDS = marked(GPTConfig, "shape")
# Fields whose checkpointed values win on resume (the optimizer state and base LR are restored from the file),
# so a different value on the command line would be silently ignored: refuse it instead.
RESTORED_FIELDS = marked(OptimizerSettings, "restored")

def config_differences(stored: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """'name: stored -> current' for each field in fields whose value differs between the two hparam dicts."""
    return [f"{k}: {stored[k]!r} -> {current.get(k)!r}" for k in fields if k in stored and stored[k] != current.get(k)]


def check_resume_config(stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses a resume whose model shape, or whose restored optimizer settings, differ from the checkpoint's."""
    shape = config_differences(stored, current, SHAPE_FIELDS)
    restored = config_differences(stored, current, RESTORED_FIELDS)
    if shape:
        raise NanoGPTError(
            f"the checkpoint's model differs from the config ({'; '.join(shape)}); resume with the model settings "
            "it was trained with, or start a new run in another --trainer.default_root_dir"
        )
    if restored:
        raise NanoGPTError(
            f"these settings are restored from the checkpoint and cannot change on resume ({'; '.join(restored)}); "
            "drop them from the command line, or start a new run"
        )


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, as data torch.load(weights_only) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Puts back states captured by capture_rng_state (CUDA only where this process has the same GPUs)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
