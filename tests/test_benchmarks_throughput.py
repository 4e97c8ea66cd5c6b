"""The benchmark scripts run for real (both sides of the harness) and report their figures (no timing asserted).

They run in this process (as `main(argv)`), which saves two interpreter and torch start-ups per test.
"""

import json

import pytest

from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.slow  # real training runs, Lightning and plain


@pytest.fixture
def benchmarks(monkeypatch, tmp_path):
    """The benchmarks/ scripts importable as they import each other when run as scripts; cwd an empty dir."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _last_json_line(capsys) -> tuple[dict, str]:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_harness_prints_both_figures_as_its_last_line(benchmarks, capsys):
    import throughput

    throughput.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--repeats", "1",
                     "--device", "cpu", "--trainer.log_every_n_steps", "2"])
    last, out = _last_json_line(capsys)
    assert last["ours_tokens_per_s"] > 0 and last["plain_tokens_per_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_tokens_per_s"] / last["plain_tokens_per_s"], rel=1e-3)
    assert last["device"] == "cpu" and last["config"] == str(TINY_CONFIG)
    assert len(last["ours_runs"]) == len(last["plain_runs"]) == 1
    pair = last["ours_runs"][0] / last["plain_runs"][0]
    assert last["paired_ratios"] == [pytest.approx(pair, rel=1e-3)] and last["paired_ratio_median"] == pytest.approx(pair, rel=1e-3)
    assert last["ours_cpu_ms_per_step"] > 0 and last["plain_cpu_ms_per_step"] > 0
    # 6 timed steps in windows of log_every_n_steps (2): each run's median window gives a tokens/s of its own
    (ours_w,), (plain_w,) = last["ours_window_runs"], last["plain_window_runs"]
    assert ours_w > 0 and plain_w > 0
    assert last["windowed_ratio"] == pytest.approx(ours_w / plain_w, rel=1e-3)
    assert "windowed ratio" in out
    # the same weights, batches and optimizer on both sides: the same loss after the same 8 steps
    assert last["ours_final_loss"] == pytest.approx(last["plain_final_loss"], rel=1e-5)
    assert 2.0 < last["plain_final_loss"] < 4.5
    assert "ours/plain" in out  # the table
    assert not list(benchmarks.iterdir())  # run dirs were temporary


def test_both_sides_train_under_the_same_bf16_autocast(benchmarks, capsys, monkeypatch):
    # the yardstick must run the very autocast context Lightning's "bf16-mixed" runs ours in: under torch.compile
    # (the GPU figures) every part of it, the weight-cast cache switch too, is a guard of the compiled graph, so a
    # different one compiles a second, different graph and the two sides no longer train the same way
    import throughput
    import torch

    from nanogpt.model import GPT

    seen: list[tuple[bool, torch.dtype, bool]] = []
    forward = GPT.forward

    def observed(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", observed)
    throughput.main(["--config", str(TINY_CONFIG), "--steps", "2", "--warmup", "1", "--repeats", "1",
                     "--device", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.log_every_n_steps", "1"])
    last, _ = _last_json_line(capsys)
    assert len(seen) >= 6  # 3 training steps on each side (validation, if any, runs in the same context)
    assert set(seen) == {seen[0]} and seen[0][:2] == (True, torch.bfloat16)
    assert last["ours_final_loss"] == last["plain_final_loss"]  # bit for bit: the same casts in the same places


def test_harness_can_interleave_the_two_sides_inside_one_run(benchmarks, capsys):
    import throughput

    throughput.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--repeats", "1",
                     "--device", "cpu", "--interleave", "--trainer.log_every_n_steps", "2"])
    last, out = _last_json_line(capsys)
    assert last["mode"] == "interleaved" and last["window_pairs"] == 3  # 6 timed steps in windows of 2
    assert last["ours_tokens_per_s"] > 0 and last["plain_tokens_per_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_tokens_per_s"] / last["plain_tokens_per_s"], rel=1e-3)
    assert last["ours_cpu_ms_per_window"] > 0 and last["plain_cpu_ms_per_window"] > 0
    # the plain loop took its 2 warm-up and 6 timed steps between ours: both end at the same loss
    assert last["ours_final_loss"] == pytest.approx(last["plain_final_loss"], rel=1e-5)
    assert "3 window pairs" in out and "ours/plain" in out


def test_interleaving_needs_a_whole_window(benchmarks, capsys):
    import throughput

    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--config", str(TINY_CONFIG), "--steps", "1", "--warmup", "1", "--repeats", "1",
                         "--device", "cpu", "--interleave"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --interleave needs --steps of at least log_every_n_steps (10)")


def test_timed_run_reports_validation_share_and_time_to_target(benchmarks, capsys):
    import timed_run

    timed_run.main(["--config", str(TINY_CONFIG), "--steps", "6", "--val-every", "3", "--target-loss", "10",
                    "--device", "cpu"])
    last, _ = _last_json_line(capsys)
    assert last["steps"] == 6 and len(last["val_pauses_s"]) == 2  # validations after steps 3 and 6
    assert last["step_s"] > 0 and 0 < last["val_share_measured"] < 1
    # projected onto tiny.yaml's own schedule: 3 validations in 300 steps
    assert last["config_schedule"] == {"max_steps": 300, "val_check_interval": 100}
    assert 0 < last["val_share_at_config_schedule"] < last["val_share_measured"]
    # each pause split: one text sample and one checkpoint callback call per validation (none for the sanity check)
    assert len(last["sample_s"]) == len(last["checkpoint_s"]) == 2
    assert all(x > 0 for x in last["sample_s"] + last["checkpoint_s"])
    parts = sum(last["sample_s"]) + sum(last["checkpoint_s"])
    # (each figure is rounded in the JSON to 4 decimals, the wall time to 3: their sum carries up to ~5e-4)
    assert last["val_loop_share_measured"] == pytest.approx(last["val_share_measured"] - parts / last["wall_s"], abs=1e-3)
    assert 0 < last["val_loop_share_at_config_schedule"] < last["val_share_at_config_schedule"]
    assert last["reached_target"]["step"] == 3  # any loss is below 10: reached at the first validation
    assert 0 < last["reached_target"]["train_s"] <= last["reached_target"]["wall_s"]
    assert not list(benchmarks.iterdir())


def test_a_pause_less_its_parts_leaves_a_part_missing_at_some_validations_in(benchmarks):
    from timed_run import without

    assert without([5.0, 7.0], [1.0, 2.0], [0.5, 0.5]) == [3.5, 4.5]
    assert without([5.0, 7.0], [], [0.5, 0.5]) == [4.5, 6.5]  # no samples: nothing to take out for them
    assert without([], [], []) == []


def test_gpu_suite_runs_every_benchmark_and_collects_their_figures(benchmarks, capsys, shakespeare_path):
    # the CPU twin of the one command a lent GPU runs: the same scripts, tiny config, no compile
    import gpu_suite

    out = benchmarks / "gpu"
    gpu_suite.main(["--smoke", "--out", str(out), "--corpus", str(shakespeare_path), "--budget-s", "400"])
    last, printed = _last_json_line(capsys)
    assert json.loads((out / "results.json").read_text()) == last
    assert list(last) == ["lecture_ratio", "time_to_target", "gpt2_124m_mfu", "generate"]
    for name, entry in last.items():
        assert entry["status"] == "ok", (name, (out / f"{name}.log").read_text()[-2000:])
        assert entry["command"].startswith("python benchmarks/") and entry["result"], name
        assert f"{name}: ok in " in printed
    assert last["lecture_ratio"]["result"]["ratio"] > 0
    assert last["time_to_target"]["result"]["reached_target"]["step"] == 2 and last["time_to_target"]["result"]["steps"] == 2
    assert last["gpt2_124m_mfu"]["result"]["ours_mfu"] > 0
    assert last["generate"]["result"]["speedup"] > 0


def test_gpu_suite_refuses_a_benchmark_it_does_not_have(benchmarks, capsys):
    import gpu_suite

    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--smoke", "--out", str(benchmarks / "gpu"), "--only", "lecture_ratio", "mfu"])
    assert e.value.code == 2
    assert "no benchmark named ['mfu']" in capsys.readouterr().err


def test_step_calls_counts_both_sides_per_step(benchmarks, capsys):
    import step_calls

    step_calls.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--device", "cpu"])
    last, out = _last_json_line(capsys)
    assert last["ours_calls_per_step"] > last["plain_calls_per_step"] > 100  # a step is hundreds of calls either way
    assert last["extra_calls_per_step"] == pytest.approx(last["ours_calls_per_step"] - last["plain_calls_per_step"], abs=0.2)
    assert sum(last["by_package"].values()) == pytest.approx(last["ours_calls_per_step"], abs=0.5)
    assert last["by_package"]["lightning"] > 0 and "lightning" not in last["plain_by_package"]
    assert last["plain_by_package"]["torch"] > 0 and "calls per step" in out
    assert not list(benchmarks.iterdir())


def test_step_budget_times_logging_steps_and_the_guard(benchmarks, capsys):
    import step_budget

    step_budget.main(["--config", str(TINY_CONFIG), "--steps", "12", "--warmup", "2", "--rounds", "2",
                      "--trainer.log_every_n_steps", "3"])
    last, out = _last_json_line(capsys)
    assert last["log_every_n_steps"] == 3
    assert (last["logging_steps"], last["other_steps"]) == (4, 7)  # steps 2..12 timed (the last has no end mark)
    assert last["step_ms"] > 0 and last["optimizer_end_us"] > 0
    assert last["logging_ms_per_step"] == pytest.approx(last["logging_step_extra_ms"] / 3, abs=1e-3)
    assert {"guard_us_per_step", "guard_on_device_us_per_step"} <= set(last) and "a logging step" in out
    assert not list(benchmarks.iterdir())


def test_lightning_floor_trains_all_three_sides_alike(benchmarks, capsys):
    import lightning_floor

    lightning_floor.main(["--config", str(TINY_CONFIG), "--steps", "3", "--warmup", "1", "--repeats", "1",
                          "--trainer.log_every_n_steps", "2"])
    last, out = _last_json_line(capsys)
    for side in ("ours", "bare", "plain"):
        assert last[f"{side}_ms"] > 0 and last["wall_ms"][side] > 0 and len(last["cpu_ms_runs"][side]) == 1
    assert last["ours_minus_bare_ms"] == pytest.approx(last["ours_ms"] - last["bare_ms"], abs=2e-3)
    assert last["bare_minus_plain_ms"] == pytest.approx(last["bare_ms"] - last["plain_ms"], abs=2e-3)
    # the same weights, batches, optimizer, schedule and clipping: the same loss after the same 4 steps
    losses = last["final_loss"]
    assert losses["ours"] == pytest.approx(losses["plain"], rel=1e-5) and losses["bare"] == pytest.approx(losses["plain"], rel=1e-5)
    assert "Lightning's loop over the plain loop" in out
    assert not list(benchmarks.iterdir())  # run dirs were temporary


def test_step_windows_cut_the_training_clock_into_equal_steps():
    from timing import step_windows

    assert step_windows([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0], 2) == [3.0, 7.0, 11.0]
    assert step_windows([0.0, 1.0, 3.0, 6.0, 10.0, 15.0], 2) == [3.0, 7.0]  # a short last window is left out
    assert step_windows([0.0, 1.0], 2) == []


def test_the_run_timer_keeps_validation_out_of_its_step_clock(benchmarks):
    # checked against raw step-end times, not against a speed: the clock must drop exactly each validation pause
    # from the step after it, however fast or loaded this machine is
    import time

    import lightning as L
    import throughput
    from timing import RunTimer

    class SlowValidation(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                time.sleep(0.3)

    class RawEnds(L.Callback):
        def __init__(self):
            self.ends = {}

        def on_train_batch_end(self, trainer, *args):
            self.ends[trainer.global_step] = time.perf_counter()

    args, config_args = throughput.parse_args(["--config", str(TINY_CONFIG), "--steps", "8", "--warmup", "2",
                                               "--device", "cpu", "--trainer.val_check_interval", "4"])
    cli = throughput.build_cli(args, config_args, str(benchmarks / "run"))
    timer, raw = RunTimer(warmup=2), RawEnds()
    cli.trainer.callbacks.extend([SlowValidation(), timer, raw])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(timer.val_pauses) == 2 and min(timer.val_pauses) >= 0.3  # after steps 4 and 8
    assert len(timer.step_ends) == 9  # the end of step 2 and of each of the 8 timed steps
    clock = [b - a for a, b in zip(timer.step_ends, timer.step_ends[1:])]  # steps 3..10 on the clock
    wall = [raw.ends[s] - raw.ends[s - 1] for s in range(3, 11)]  # the same steps on the wall
    dropped = [w - c for w, c in zip(wall, clock)]
    first, second = timer.val_pauses
    assert dropped == pytest.approx([0, 0, first, 0, 0, 0, second, 0], abs=0.01)  # from steps 5 and 9
    assert timer.step_ends[-1] - timer.step_ends[0] == pytest.approx(timer.train_seconds, abs=0.05)


def test_the_run_timer_clocks_every_step_without_warmup(benchmarks):
    import throughput
    from timing import RunTimer, step_windows

    args, config_args = throughput.parse_args(["--config", str(TINY_CONFIG), "--steps", "4", "--warmup", "0",
                                               "--device", "cpu"])
    cli = throughput.build_cli(args, config_args, str(benchmarks / "run"))
    timer = RunTimer(warmup=0)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert timer.timed_steps == 4 and len(timer.step_ends) == 5  # the start of step 1 and the end of each step
    assert len(step_windows(timer.step_ends, 2)) == 2


def test_step_phases_splits_both_sides_steps_at_the_same_points(benchmarks, capsys):
    import step_phases

    step_phases.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--repeats", "1",
                      "--trainer.log_every_n_steps", "3"])
    last, out = _last_json_line(capsys)
    for side in ("ours_ms", "plain_ms"):
        assert set(last[side]) == set(step_phases.PHASES)
        assert all(v > 0 for v in last[side].values()), last[side]
        assert last[side]["step"] > last[side]["backward"] > 0
    assert all(last["extra_ms"][p] == pytest.approx(last["ours_ms"][p] - last["plain_ms"][p], abs=2e-3)
               for p in step_phases.PHASES)
    assert "between" in out and "update" in out


def test_phase_clock_counts_whole_steps_only():
    from step_phases import PhaseClock

    clock = PhaseClock()
    clock.marks = [("end", 0.0), ("batch", 1.0), ("forward", 3.0), ("backward", 6.0), ("end", 7.0),  # step 1
                   ("batch", 8.0), ("forward", 9.0), ("end", 9.5),  # a step without a backward mark: left out
                   ("batch", 10.0), ("forward", 11.0), ("backward", 12.0), ("end", 14.0)]  # step 3
    assert clock.phases(1, set()) == {"between": [1.0, 0.5], "forward": [2.0, 1.0], "backward": [3.0, 1.0],
                                      "update": [1.0, 2.0], "step": [7.0, 4.5]}
    assert clock.phases(2, set())["step"] == [4.5]
    assert clock.phases(1, {3})["step"] == [7.0]
