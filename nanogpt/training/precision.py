"""Which precision a run trains in when --trainer.precision is not given: by the GPU's tensor cores.

    compute capability >= 8.0 (A100, A10, L4, L40S, RTX 30xx/40xx, H100, H200, B200): bf16-mixed, bf16 tensor cores;
    7.x (V100, T4, RTX 20xx): 16-mixed, fp16 tensor cores with a GradScaler (their bf16 is emulated, and slower);
    below 7.0 and on CPUs: 32-true.

The choice is a pure function of the device's capability and name (choose_precision), so every generation is
testable on a CPU; device_precision reads them from torch. torch.cuda.is_bf16_supported() is not used: in torch 2.13
it counts emulated bf16 (including_emulation=True by default) and says True on a T4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first tensor cores with bf16
FP16_MIN_CAPABILITY = (7, 0)  # Volta: the first tensor cores (fp16 only)


@dataclass(frozen=True)
class PrecisionChoice:
    """A precision for Trainer(precision=...) and why, for the one line a run prints at its start."""

    precision: str
    reason: str

    def describe(self) -> str:
        return f"precision: {self.precision} ({self.reason})"


def _gpu(name: str, capability: tuple[int, int]) -> str:
    return f"{name}, compute capability {capability[0]}.{capability[1]}"


def choose_precision(capability: Optional[tuple[int, int]], name: str = "GPU") -> PrecisionChoice:
    """The precision for a CUDA device of this compute capability, or for a CPU (capability None)."""
    if capability is None:
        return PrecisionChoice("32-true", "no GPU; mixed precision pays off on GPU tensor cores")
    gpu = _gpu(name, capability)
    if capability >= BF16_MIN_CAPABILITY:
        return PrecisionChoice("bf16-mixed", f"{gpu}: bf16 tensor cores, no loss scaling needed")
    if capability >= FP16_MIN_CAPABILITY:
        return PrecisionChoice(
            "16-mixed", f"{gpu}: fp16 tensor cores with loss scaling; bf16 here would be emulated, and slower"
        )
    return PrecisionChoice("32-true", f"{gpu}: no tensor cores, so mixed precision would gain little")


def _uses_cuda(accelerator: object) -> bool:
    """Whether Trainer(accelerator=...) trains on CUDA GPUs here (an Accelerator instance counts by its kind)."""
    if not torch.cuda.is_available():
        return False
    if accelerator is None or isinstance(accelerator, str):
        return str(accelerator or "auto").lower() in ("auto", "gpu", "cuda")
    return type(accelerator).__name__ == "CUDAAccelerator"


def device_precision(accelerator: object = "auto") -> PrecisionChoice:
    """choose_precision for the GPUs this process would train on (the least capable one), or for the CPU."""
    if not _uses_cuda(accelerator):
        return choose_precision(None)
    if torch.version.hip:
        # ROCm reports its own architecture numbers as a capability; ask torch about real (not emulated) bf16
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16-mixed", f"{name} (ROCm): native bf16")
        return PrecisionChoice("32-true", f"{name} (ROCm): no native bf16")
    # every rank sees the same devices, so every rank chooses the same; the least capable GPU decides
    index = min(range(torch.cuda.device_count()), key=torch.cuda.get_device_capability)
    return choose_precision(torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))


def resolve_precision(given: Optional[str], accelerator: object = "auto") -> PrecisionChoice:
    """--trainer.precision when given (it always wins), else device_precision; the reason says which."""
    default = device_precision(accelerator)
    if given is None:
        return PrecisionChoice(default.precision, f"{default.reason}; --trainer.precision overrides")
    given = str(given)
    if given == default.precision:
        return PrecisionChoice(given, "set by --trainer.precision")
    # say what the device would have had, so a config written for another GPU is noticed
    return PrecisionChoice(given, f"set by --trainer.precision; this machine's default is {default.precision}, "
                                  f"{default.reason}")


def is_fp16_mixed(precision: object) -> bool:
    return str(precision) in ("16", "16-mixed")  # Lightning reads 16 and "16" as "16-mixed"


def runs_on_cpu(accelerator: object) -> bool:
    """Whether Trainer(accelerator=...) trains on the CPU here."""
    if isinstance(accelerator, str) and accelerator.lower() == "cpu":
        return True
    if accelerator in (None, "auto"):
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return type(accelerator).__name__ == "CPUAccelerator"


def cpu_fp16_plugin(precision: object, accelerator: object) -> Optional[object]:
    """fp16 mixed precision on a CPU, as on a GPU (autocast to float16 and a GradScaler), for 16-mixed on a CPU.

    Given precision="16-mixed" on a CPU, Lightning trains in bf16 instead (with a warning); this plugin keeps the
    fp16 that was asked for, so the CPU is a true twin of a V100's or T4's fp16 path (torch autocasts fp16 on CPUs
    and has a CPU GradScaler). None where Lightning's own choice stands. Pass it in plugins, with precision=None.
    """
    if not (is_fp16_mixed(precision) and runs_on_cpu(accelerator)):
        return None
    from lightning.pytorch.plugins import MixedPrecision

    return MixedPrecision("16-mixed", "cpu")
