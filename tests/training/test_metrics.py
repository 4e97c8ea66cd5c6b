"""README "TensorBoard" promises: the text sample's seed (val/sample read back from the event files) and the GPU
peak table behind train/mfu."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanogpt.model import GPT, GPTConfig
from nanogpt.training.metrics import flops_per_token, gpu_peak_tflops  # the one import of the peak table (and its MFU formula)
from tests.conftest import TINY_CONFIG, run_train


@pytest.mark.parametrize(
    "device_name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # H100 SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H20", None),  # not an H200: a much smaller part, whose peak the table does not know
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA L40S", None),
    ],
)
def test_gpu_peak_table_gives_the_right_mfu(device_name, peak):
    """torch.cuda.get_device_name() strings as those GPUs report them; an unknown GPU gets no MFU, not a wrong one."""
    assert gpu_peak_tflops(device_name) == peak
    if peak is None:
        return
    # train/mfu = FLOPs per token x tokens/s over the peak: the lecture's model at 2M tokens/s
    config = GPTConfig()
    per_token = flops_per_token(config, GPT(config).num_params(non_embedding=True))  # about 7.1e7
    mfu = per_token * 2e6 / (gpu_peak_tflops(device_name) * 1e12)
    assert mfu == pytest.approx(per_token * 2e6 / (peak * 1e12))
    assert 0.1 < mfu < 0.5  # about 1.4e14 FLOP/s of work on a few hundred TFLOP/s


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
