"""Bad steps roll back (nanogpt/training/rollback.py), on real training runs of the tiny config with faults injected
by a callback given in a config (tests/training/faults.py): a loss spike, NaN loss, NaN gradient, NaN weights at a
save, too many rollbacks, --fault.on_bad_step stop, a resume after a rollback, and 2-process DDP.

Every run is 30 steps at most: validation and checkpoints every 10 steps, logs (and reads of the loss) every 5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanogpt.data.blocks import DataSkips, RandomBlocks, sample_rank_batch
from nanogpt.training.rollback import SpikeDetector
from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_script, run_train

STEPS = 30
COMMON = ["--config", TINY_CONFIG, "--trainer.max_steps", STEPS, "--trainer.val_check_interval", "10",
          "--trainer.log_every_n_steps", "5", "--model.decay_steps", STEPS, "--fault.spike_window", "8",
          "--fault.spike_warmup", "8", "--quiet"]


def faults_config(path: Path, *faults: dict) -> Path:
    """A config adding tests.training.faults.Fault callbacks (and RecordSkips) to a run."""
    entries = [{"class_path": "tests.training.faults.Fault", "init_args": f} for f in faults]
    entries.append({"class_path": "tests.training.faults.RecordSkips"})
    path.write_text(json.dumps({"trainer": {"callbacks": entries}}), encoding="utf-8")
    return path


def _train(run: Path, cache: Path, *extra, check: bool = True):
    env = {"NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"}
    result = run_script("train.py", *COMMON, "--trainer.default_root_dir", run, *extra, cwd=run.parent, env=env)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def _history(run: Path) -> list[dict]:
    return _ckpt(run)["callbacks"]["Rollback"]["history"]


def _rollback_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("rollback: ")]


def _final_val(run: Path) -> float:
    return read_scalars(run)["val/loss"][-1][1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, nanogpt_cache):
    """A clean run; the same run with every weight x30 before step 15 (a spike: back to step 10); that run stopped at
    step 22 and resumed; and one run hit by a NaN loss, a NaN gradient and NaN weights in turn."""
    work = tmp_path_factory.mktemp("rollback")
    out = {"clean": _train(work / "clean", nanogpt_cache)}
    spike = faults_config(work / "spike.yaml", {"step": 15, "what": "scale", "factor": 30})
    out["spike"] = _train(work / "spike", nanogpt_cache, "--config", spike)
    out["stopped"] = _train(work / "resumed", nanogpt_cache, "--config", spike, "--trainer.max_steps", "22")
    out["resumed"] = _train(work / "resumed", nanogpt_cache, "--ckpt_path", "last")
    nans = faults_config(work / "nans.yaml", {"step": 12, "what": "nan_loss"}, {"step": 17, "what": "nan_grad"},
                         {"step": 29, "what": "nan_weights"})
    out["nans"] = _train(work / "nans", nanogpt_cache, "--config", nans)
    return work, out


@pytest.mark.slow
def test_a_loss_spike_rolls_back_once_skips_its_data_and_ends_near_a_clean_run(runs):
    work, out = runs
    run = work / "spike"
    lines = _rollback_lines(out["spike"])
    assert len(lines) == 1, out["spike"].stdout[-3000:]
    assert "step 15 was bad" in lines[0] and "x the running mean" in lines[0], lines[0]
    assert "returned to step 10 (last.ckpt)" in lines[0] and "skipped 6 steps" in lines[0], lines[0]
    assert _ckpt(run)["global_step"] == STEPS
    assert _history(run) == [{"bad_step": 15, "kind": "spike", "why": _history(run)[0]["why"], "returned_to": 10,
                              "checkpoint": "last.ckpt", "skipped": 6}]
    assert json.loads((run / "skips-rank0.json").read_text()) == [[10, 6]]
    scalars = read_scalars(run)
    assert scalars["train/rollbacks"] == [(0, 0.0), (10, 1.0)]
    # the abandoned steps 10-19 were purged from the curves: one train/loss point per logged step
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == sorted(set(steps)) and max(v for _, v in scalars["train/loss"]) < 10
    clean = _final_val(work / "clean")
    assert abs(_final_val(run) - clean) / clean < 0.05, (_final_val(run), clean)


@pytest.mark.slow
def test_the_rollback_is_a_text_entry_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, _ = runs
    acc = EventAccumulator(str(work / "spike"), size_guidance={"tensors": 0})
    acc.Reload()
    [event] = acc.Tensors("train/rollback")
    assert event.step == 10
    assert "step 15 was bad" in event.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_a_run_stopped_and_resumed_after_a_rollback_continues_bit_identically(runs):
    work, out = runs
    assert len(_rollback_lines(out["stopped"])) == 1
    assert "rollbacks so far: 1 (step 15 was bad" in out["resumed"].stdout  # the history, shown on resume
    straight, resumed = _ckpt(work / "spike"), _ckpt(work / "resumed")
    assert resumed["global_step"] == straight["global_step"] == STEPS
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert _history(work / "resumed") == _history(work / "spike")
    assert read_scalars(work / "resumed")["train/rollbacks"][-1] == (22, 1.0)


@pytest.mark.slow
def test_nan_loss_nan_gradient_and_nan_weights_at_a_save_each_roll_back(runs):
    work, out = runs
    run = work / "nans"
    lines = _rollback_lines(out["nans"])
    assert len(lines) == 3, out["nans"].stdout[-3000:]
    history = _history(run)
    # the loss of step 12 is read at step 15; the gradient of step 17 at once (a CPU reads its norm as a float);
    # the weights after step 29 before the checkpoint of step 30
    assert [(r["bad_step"], r["kind"], r["returned_to"]) for r in history] == [
        (12, "non-finite", 10), (17, "non-finite", 10), (29, "weights", 20)]
    assert "NaN or inf" in lines[0] and "NaN or inf" in lines[2]
    assert _ckpt(run)["global_step"] == STEPS
    for path in (run / "checkpoints").glob("*.ckpt"):
        assert all(torch.isfinite(t).all() for t in _ckpt(run, path.name)["state_dict"].values()), path
    clean = _final_val(work / "clean")
    assert abs(_final_val(run) - clean) / clean < 0.05, (_final_val(run), clean)


@pytest.mark.slow
def test_too_many_rollbacks_stop_with_one_line(tmp_path, capsys, shakespeare_path):
    config = faults_config(tmp_path / "twice.yaml", {"step": 15, "what": "scale", "times": 2})
    run = tmp_path / "run"
    result = run_train(capsys, *COMMON, "--trainer.default_root_dir", run, "--data.source", shakespeare_path,
                       "--data.cache_dir", tmp_path / "cache", "--config", config, "--fault.max_rollbacks", "1")
    assert result.returncode == 2
    assert_user_error(result, "the training loss spiked at step 15", "--fault.max_rollbacks 1")
    assert len(_rollback_lines(result)) == 1
    assert _ckpt(run)["global_step"] == 10  # the good checkpoint is untouched


@pytest.mark.slow
def test_on_bad_step_stop_stops_at_the_spike_with_one_line(tmp_path, capsys, shakespeare_path):
    config = faults_config(tmp_path / "spike.yaml", {"step": 15, "what": "scale"})
    run = tmp_path / "run"
    result = run_train(capsys, *COMMON, "--trainer.default_root_dir", run, "--data.source", shakespeare_path,
                       "--data.cache_dir", tmp_path / "cache", "--config", config, "--fault.on_bad_step", "stop")
    assert result.returncode == 2
    assert_user_error(result, "the training loss spiked at step 15", "x the running mean")
    assert not _rollback_lines(result)
    assert _ckpt(run)["global_step"] == 10
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} == {"last.ckpt", "best.ckpt", "step-00000010.ckpt"}


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_roll_back_together_on_one_ranks_spike(runs, nanogpt_cache):
    work, _ = runs
    run = work / "ddp"
    config = faults_config(work / "rank1.yaml", {"step": 15, "what": "scale", "rank": 1})
    result = _train(run, nanogpt_cache, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--config", config)
    lines = _rollback_lines(result)
    assert len(lines) == 1 and "step 15 was bad" in lines[0] and "on rank 1" in lines[0], result.stdout[-3000:]
    skips = [json.loads((run / f"skips-rank{r}.json").read_text()) for r in (0, 1)]
    assert skips == [[[10, 6]], [[10, 6]]]  # both ranks skip the same window
    assert _ckpt(run)["global_step"] == STEPS
    clean = _final_val(work / "clean")  # one process, the same global batch
    assert abs(_final_val(run) - clean) / clean < 0.05, (_final_val(run), clean)


# ---- units: no training ------------------------------------------------------------------------------------------


def test_skipped_data_is_a_pure_function_of_the_step_and_the_skips(shakespeare_text):
    import numpy as np

    tokens = np.frombuffer(shakespeare_text[:20000].encode(), dtype=np.uint8)
    skips = DataSkips(((10, 6), (20, 3)))
    assert [skips.data_step(s) for s in (9, 10, 19, 20)] == [9, 16, 25, 29]
    stream = iter(RandomBlocks(tokens, 8, 2, seed=1, rank=0, start_step=2 * 19, accumulation=2, skips=skips))
    for micro in (2 * 25, 2 * 25 + 1, 2 * 29):  # steps 19 (twice: its two micro-batches) and 20
        x, _ = next(stream)
        assert torch.equal(x, sample_rank_batch(tokens, 8, 2, 1, 0, micro, accumulation=2)[0])


def test_a_spike_is_judged_against_the_median_of_earlier_losses_on_any_rank():
    detector = SpikeDetector(factor=2.0, window=4, warmup=3)
    assert detector.judge([0, 1, 2], [[9.0, 3.0, 3.1], [9.0, 3.2, 3.0]]) is None  # before warmup: never
    assert detector.judge([3, 4], [[float("nan"), 2.9], [3.1, 3.0]]) is None  # NaN is the guard's, not a spike
    bad = detector.judge([5, 6], [[3.0, 100.0], [3.0, 7.0]])
    assert bad is not None and bad.step == 6 and "on rank 0" in bad.why
    # one outlier inside the window moves the median little: 6.5 is a spike against it
    detector = SpikeDetector(factor=2.0, window=5, warmup=0)
    assert detector.judge([0, 1, 2, 3, 4], [[3.0, 3.0, 5.9, 3.0, 3.0]]) is None
    assert detector.judge([5], [[6.5]]).step == 5
