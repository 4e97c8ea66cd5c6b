"""README "TensorBoard" promises: the text sample's seed (val/sample read back from the event files) and the GPU
peak table behind train/mfu."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanogpt.model import GPT, GPTConfig
from nanogpt.training.metrics import flops_per_token
from nanogpt.training.peaks import gpu_peak_tflops  # the one test of the peak table
from tests.conftest import TINY_CONFIG, run_train


# torch.cuda.get_device_name() strings as those GPUs report them, with the dense peak of their fastest tensor-core
# precision (bf16, or fp16 where there is no bf16)
LISTED = [
    ("NVIDIA B200", 2250.0),
    ("NVIDIA H200", 989.5),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA H100 80GB HBM3", 989.5),  # H100 SXM
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.5),  # holds the letters "H200", but is the Grace Hopper superchip
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA RTX 6000 Ada Generation", 364.2),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
    ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-SXM2-32GB", 125.0),
    ("Tesla V100-PCIE-16GB", 112.0),
    ("Tesla V100-PCIE-32GB", 112.0),
    ("Tesla T4", 65.0),
]
FP16_ONLY = {"Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB", "Tesla T4"}


@pytest.fixture(scope="module")
def lecture_flops_per_token() -> int:
    config = GPTConfig()
    return flops_per_token(config, GPT(config).num_params(non_embedding=True))  # about 7.1e7


@pytest.mark.parametrize("device_name, peak", LISTED)
def test_every_listed_gpu_has_the_peak_of_the_precision_it_trains_in(device_name, peak, lecture_flops_per_token):
    fp16_only = device_name in FP16_ONLY
    # the precision the chooser gives it: fp16 with loss scaling on V100 and T4, bf16 on the others
    assert gpu_peak_tflops(device_name, "16-mixed" if fp16_only else "bf16-mixed") == peak
    assert gpu_peak_tflops(device_name, "16-mixed") == peak  # fp16 with fp32 accumulation: the same dense peak
    assert gpu_peak_tflops(device_name, "bf16-mixed") == (None if fp16_only else peak)  # emulated bf16: no peak
    assert gpu_peak_tflops(device_name, "32-true") is None  # no tensor-core row for fp32 (TF32) in the table
    # train/mfu = FLOPs per token x tokens/s over the peak: the lecture's model at 2M tokens/s
    mfu = lecture_flops_per_token * 2e6 / (peak * 1e12)
    assert 0.05 < mfu < 3  # about 1.4e14 FLOP/s of work on tens to thousands of TFLOP/s


@pytest.mark.parametrize(
    "device_name",
    [
        "NVIDIA H20",  # not an H200: a much smaller part
        "NVIDIA H800",
        "NVIDIA GB200",
        "NVIDIA L40",  # not the L40S
        "Quadro RTX 6000",  # Turing, not the RTX 6000 Ada
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the GPU
        "NVIDIA GeForce RTX 5090",
        "Tesla P100-PCIE-16GB",
        "cpu",
    ],
)
def test_a_gpu_not_in_the_table_gets_no_peak_rather_than_a_wrong_one(device_name):
    assert gpu_peak_tflops(device_name, "bf16-mixed") is None
    assert gpu_peak_tflops(device_name, "16-mixed") is None


def _samples(run: Path) -> dict[int, str]:
    """The val/sample texts of a run dir's event files, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode("utf-8") for e in acc.Tensors("val/sample")}


@pytest.mark.slow  # three short training runs
def test_sample_seed_gives_the_same_text_on_two_runs(tmp_path, shakespeare_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run = tmp_path / name
        result = run_train(None, "--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--trainer.max_steps", 3,
                           "--trainer.val_check_interval", 3, "--data.source", shakespeare_path, "--data.cache_dir",
                           tmp_path / "cache", "--monitor.sample_tokens", 40, "--monitor.sample_prompt", "ROMEO:",
                           "--monitor.sample_seed", seed, "--quiet")
        assert result.returncode == 0
        runs[name] = _samples(run)
    assert list(runs["a"]) == [2] and "ROMEO:" in runs["a"][2]
    assert runs["a"] == runs["b"]  # the same model (same training seed) and the same sample seed
    assert runs["c"] != runs["a"]  # only the sample seed differs


@pytest.mark.parametrize(
    "device_name, precision, peak",
    [
        ("Tesla T4", "16-mixed", 65.0),  # the precision in use picks the peak
        ("NVIDIA A100-SXM4-40GB", "bf16-mixed", 312.0),
        ("NVIDIA GeForce RTX 5090", "bf16-mixed", None),  # not in the table
        ("NVIDIA A100-SXM4-40GB", "32-true", None),  # no fp32 row
    ],
)
def test_the_monitor_takes_the_peak_of_the_precision_in_use_or_says_why_not(monkeypatch, device_name, precision,
                                                                           peak):
    """TrainingMonitor.on_fit_start on a GPU, its CPU twin: torch.cuda names the GPU, the module says it is on cuda."""
    from types import SimpleNamespace

    import torch

    from nanogpt.training import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    # what the monitor says on rank 0 (rank_zero_info); read at the call, since the logger Lightning writes it to,
    # its level and its handlers are process-wide state that other libraries in a test process change
    lines: list[str] = []
    monkeypatch.setattr(metrics, "rank_zero_info", lambda message, *args, **kwargs: lines.append(message))
    monitor = metrics.TrainingMonitor(sample_tokens=0)
    module = SimpleNamespace(tokenizer=None, model=GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=1,
                                                                 n_embd=8)), device=torch.device("cuda", 0))
    monitor.on_fit_start(SimpleNamespace(precision=precision, world_size=2), module)
    assert monitor._peak_flops == (peak * 1e12 * 2 if peak else None)  # per device, times the devices
    said = [line for line in lines if line.startswith("train/mfu:")]
    if peak:
        assert said == []
    else:
        assert said == [f"train/mfu: no {precision} peak known for {device_name}; set its dense TFLOP/s with "
                        "--monitor.peak_tflops to log MFU"]
