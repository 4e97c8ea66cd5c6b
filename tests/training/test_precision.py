"""The precision a run trains in when none is given: by the GPU's compute capability, never emulated bf16."""

from __future__ import annotations

import pytest
import torch

from nanogpt.training.precision import choose_precision, cpu_fp16_plugin, device_precision, resolve_precision


@pytest.mark.parametrize(
    "capability, name, precision",
    [
        ((6, 0), "Tesla P100-PCIE-16GB", "32-true"),  # Pascal: no tensor cores
        ((6, 1), "NVIDIA GeForce GTX 1080 Ti", "32-true"),
        ((7, 0), "Tesla V100-SXM2-16GB", "16-mixed"),  # Volta: fp16 tensor cores only
        ((7, 5), "Tesla T4", "16-mixed"),  # Turing (and RTX 20xx): the same
        ((8, 0), "NVIDIA A100-SXM4-80GB", "bf16-mixed"),  # Ampere: bf16 tensor cores
        ((8, 6), "NVIDIA A10G", "bf16-mixed"),
        ((8, 9), "NVIDIA L4", "bf16-mixed"),  # Ada
        ((9, 0), "NVIDIA H100 80GB HBM3", "bf16-mixed"),  # Hopper
        ((10, 0), "NVIDIA B200", "bf16-mixed"),  # Blackwell
        ((12, 0), "NVIDIA GeForce RTX 5090", "bf16-mixed"),
    ],
)
def test_each_generation_gets_the_precision_of_its_tensor_cores(capability, name, precision):
    choice = choose_precision(capability, name)
    assert choice.precision == precision
    line = choice.describe()
    assert line.startswith(f"precision: {precision} (") and "\n" not in line
    assert f"{name}, compute capability {capability[0]}.{capability[1]}" in line  # what was found, and why
    if precision == "16-mixed":
        assert "emulated" in line  # why not bf16, on parts where torch would offer it


def test_a_cpu_trains_in_full_precision():
    assert choose_precision(None).precision == "32-true"
    assert device_precision("cpu").precision == "32-true"  # asked for the CPU: a GPU beside it does not count


def _fake_gpus(monkeypatch, *gpus: tuple[str, tuple[int, int]]) -> None:
    """The CPU twin of a CUDA machine for the chooser: torch.cuda's answers for these GPUs.

    is_bf16_supported says True, as torch 2.13 does on a T4 (emulation counted): the chooser must not ask it.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i][1])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda", None])
def test_a_t4_gets_fp16_not_the_bf16_torch_would_emulate(monkeypatch, accelerator):
    _fake_gpus(monkeypatch, ("Tesla T4", (7, 5)))
    assert device_precision(accelerator).precision == "16-mixed"
    assert device_precision("cpu").precision == "32-true"


def test_the_least_capable_gpu_decides_so_every_rank_agrees(monkeypatch):
    _fake_gpus(monkeypatch, ("NVIDIA A100-SXM4-40GB", (8, 0)), ("Tesla V100-SXM2-16GB", (7, 0)))
    choice = device_precision("auto")
    assert choice.precision == "16-mixed" and "V100" in choice.reason


def test_the_given_precision_always_wins_and_says_what_the_default_was(monkeypatch):
    _fake_gpus(monkeypatch, ("Tesla T4", (7, 5)))
    chosen = resolve_precision(None, "auto")
    assert chosen.precision == "16-mixed" and chosen.reason.endswith("--trainer.precision overrides")
    assert resolve_precision("16-mixed", "auto").describe() == "precision: 16-mixed (set by --trainer.precision)"
    forced = resolve_precision("bf16-mixed", "auto")
    assert forced.precision == "bf16-mixed"  # emulated, but asked for
    assert "this machine's default is 16-mixed, Tesla T4" in forced.describe()
    assert resolve_precision("32-true", "cpu").precision == "32-true"


def test_fp16_on_a_cpu_is_kept_fp16_with_a_grad_scaler():
    # Lightning turns precision="16-mixed" on a CPU into bf16; the plugin keeps the fp16 the CPU tests rely on
    plugin = cpu_fp16_plugin("16-mixed", "cpu")
    assert plugin.precision == "16-mixed" and plugin.device == "cpu"
    assert isinstance(plugin.scaler, torch.amp.GradScaler)
    assert cpu_fp16_plugin(16, "cpu") is not None  # Lightning's legacy spelling
    assert cpu_fp16_plugin("bf16-mixed", "cpu") is None and cpu_fp16_plugin("32-true", "cpu") is None
    assert cpu_fp16_plugin("16-mixed", "gpu") is None  # a GPU's fp16 is Lightning's own
