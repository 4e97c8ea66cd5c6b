"""Peak dense tensor-core TFLOP/s of the GPUs people train on, by precision: the denominator of train/mfu.

Figures are NVIDIA's published ones, dense (datasheets print "X | 2X*" or "2X*", the starred one with 2:4 sparsity,
which training does not use: the table halves those). Where a GPU has bf16 tensor cores its fp16 dense peak (with fp32
accumulation, as autocast's matmuls use) is the same figure on every part listed, so one number serves both; V100
and T4 have fp16 tensor cores only. --monitor.peak_tflops overrides the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPUPeak:
    """One GPU: the words its torch.cuda.get_device_name() holds, and its dense peak in TFLOP/s."""

    gpu: str  # as people call it
    words: tuple[str, ...]  # all of them must be words of the device name (lowercase)
    tflops: float
    bf16: bool = True  # False: an fp16-only part (its bf16 would be emulated: no peak for it)
    unless: tuple[str, ...] = ()  # a name with any of these words is another part


# Most specific first: the first entry whose words are all in the name (and none of its `unless`) wins.
GPU_PEAK_TFLOPS: tuple[GPUPeak, ...] = (
    # Blackwell. HGX B200 datasheet: FP16/BF16 tensor 36 PFLOPS for 8 GPUs with sparsity -> 2.25 PF dense each
    GPUPeak("B200", ("b200",), 2250.0),
    # Hopper. H200 datasheet: BF16 1,979 TFLOPS (SXM), 1,671 (NVL), with sparsity
    GPUPeak("H200 NVL", ("h200", "nvl"), 835.5),
    GPUPeak("H200", ("h200",), 989.5),  # SXM; "NVIDIA H20" (a smaller part) is not the word h200
    # GH200 Grace Hopper Superchip datasheet: FP16/BF16 1,979 TFLOPS with sparsity ("NVIDIA GH200 480GB")
    GPUPeak("GH200", ("gh200",), 989.5),
    # H100 datasheet: BF16 1,979 (SXM), 1,513 (PCIe), 1,671 (NVL, per GPU) TFLOPS with sparsity
    GPUPeak("H100 PCIe", ("h100", "pcie"), 756.5),
    GPUPeak("H100 NVL", ("h100", "nvl"), 835.5),
    GPUPeak("H100 SXM", ("h100",), 989.5),  # "NVIDIA H100 80GB HBM3"
    # Ampere. A100 datasheet: BF16 312 | 624* TFLOPS, 40 and 80 GB, SXM4 and PCIe alike
    GPUPeak("A100", ("a100",), 312.0),
    # A10 datasheet: BF16 125 | 250* TFLOPS
    GPUPeak("A10", ("a10",), 125.0),
    # A10G (AWS g5): NVIDIA publishes no datasheet for it; this is the A10 datasheet's figure, the one AWS and
    # Lightning's own table (lightning.fabric.utilities.throughput) use. Unverified: set --monitor.peak_tflops if known
    GPUPeak("A10G", ("a10g",), 125.0),
    # RTX A6000 datasheet (and the GA102 whitepaper): BF16 tensor with FP32 accumulate 154.8 | 309.7* TFLOPS
    GPUPeak("RTX A6000", ("a6000",), 154.8),
    # GA102 whitepaper, appendix: RTX 3090 BF16 tensor with FP32 accumulate 71 | 142* TFLOPS (3090 Ti is faster)
    GPUPeak("RTX 3090", ("rtx", "3090"), 71.0, unless=("ti",)),
    # Ada. L4 datasheet: BF16 242* TFLOPS -> 121 dense
    GPUPeak("L4", ("l4",), 121.0),
    # L40S datasheet: BF16 362.05 | 733* TFLOPS
    GPUPeak("L40S", ("l40s",), 362.05),
    # Ada whitepaper, appendix: RTX 6000 Ada BF16 tensor with FP32 accumulate 364.2 | 728.5* TFLOPS;
    # "Quadro RTX 6000" is a Turing part without "Ada"
    GPUPeak("RTX 6000 Ada", ("rtx", "6000", "ada"), 364.2),
    # Ada whitepaper, appendix: RTX 4090 BF16 tensor with FP32 accumulate 165.2 | 330.4* TFLOPS (a 4090 D has
    # fewer SMs)
    GPUPeak("RTX 4090", ("rtx", "4090"), 165.2, unless=("d",)),
    # Volta. V100 datasheet: tensor (fp16) 125 TFLOPS SXM2, 112 PCIe; V100S datasheet: 130
    GPUPeak("V100S", ("v100s",), 130.0, bf16=False),
    GPUPeak("V100 PCIe", ("v100", "pcie"), 112.0, bf16=False),
    GPUPeak("V100 SXM", ("v100",), 125.0, bf16=False, unless=("fhhl",)),  # SXM2/SXM3, DGX Station; not the 150 W card
    # Turing. T4 datasheet: mixed precision (FP16/FP32) 65 TFLOPS
    GPUPeak("T4", ("t4",), 65.0, bf16=False),
)

# laptop parts share desktop names at a fraction of the power; a MIG slice has a fraction of the GPU's SMs
NOT_IN_TABLE = ("laptop", "mobile", "mig")


def find_gpu(device_name: str) -> Optional[GPUPeak]:
    """The table's entry for a torch.cuda.get_device_name() string, matched by whole words; None if absent."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    if words & set(NOT_IN_TABLE):
        return None
    for entry in GPU_PEAK_TFLOPS:
        if words.issuperset(entry.words) and not words & set(entry.unless):
            return entry
    return None


def gpu_peak_tflops(device_name: str, precision: str = "bf16-mixed") -> Optional[float]:
    """The dense tensor-core peak of a GPU at a Lightning precision ("bf16-mixed", "16-mixed", ...), or None:
    a GPU (or CPU) not in the table, bf16 on an fp16-only part, or a precision without a tensor-core peak here
    (32-true, 64-true, fp8)."""
    entry = find_gpu(device_name)
    kind = str(precision)
    if entry is None:
        return None
    if kind.startswith("bf16"):
        return entry.tflops if entry.bf16 else None
    if kind in ("16", "16-mixed", "16-true"):
        return entry.tflops
    return None


def missing_peak_line(device_name: str, precision: object) -> str:
    """What a run prints instead of logging train/mfu when the table has no peak for its GPU and precision."""
    return (f"train/mfu: no {precision} peak known for {device_name}; set its dense TFLOP/s with "
            "--monitor.peak_tflops to log MFU")
