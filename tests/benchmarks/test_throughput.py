"""throughput.py, plain_loop.py, timed_run.py and gpu_suite.py run for real and report their figures (no timing asserted).

They run in this process (as `main(argv)`), which saves two interpreter and torch start-ups per test.
"""

import json
import math

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

    throughput.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--repeats", "2",
                     "--device", "cpu", "--trainer.log_every_n_steps", "2"])
    last, out = _last_json_line(capsys)
    assert (last["mode"], last["device"], last["config"]) == ("runs", "cpu", str(TINY_CONFIG))
    assert (last["steps"], last["warmup"], last["repeats"]) == (6, 2, 2)
    assert last["config_args"] == ["--trainer.log_every_n_steps", "2"]
    # one figure per run of each side, every one a positive, finite rate (how large is this machine's business)
    for key in ("ours_runs", "plain_runs", "ours_window_runs", "plain_window_runs", "paired_ratios"):
        assert len(last[key]) == 2 and all(isinstance(x, float) and 0 < x < math.inf for x in last[key]), key
    for key in ("ratio", "paired_ratio_median", "windowed_ratio", "cpu_time_ratio"):
        assert isinstance(last[key], float) and 0 < last[key] < math.inf, key
    assert last["ours_cpu_ms_per_step"] > 0 and last["plain_cpu_ms_per_step"] > 0
    assert isinstance(last["threads"], int) and last["threads"] >= 1
    # the same weights, batches and optimizer on both sides: the same loss after the same 8 steps
    assert last["ours_final_loss"] == pytest.approx(last["plain_final_loss"], rel=1e-5)
    assert 2.0 < last["plain_final_loss"] < 4.5
    # the runs alternate, their order flipping each repeat: ours-plain, then plain-ours
    sides = [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("run ")]
    assert sides == ["ours", "plain", "plain", "ours"]
    assert "windowed ratio" in out and "ours/plain" in out  # the table
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


def test_harness_can_interleave_the_two_sides_inside_one_run(benchmarks, capsys, monkeypatch):
    import throughput
    import torch

    from nanogpt.model import GPT

    # which network each training forward pass ran: ours and the plain loop's are two GPT instances
    trained: list[int] = []
    forward = GPT.forward

    def observed(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not validation or the sanity check
            trained.append(id(self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", observed)
    throughput.main(["--config", str(TINY_CONFIG), "--steps", "6", "--warmup", "2", "--repeats", "1",
                     "--device", "cpu", "--interleave", "--trainer.log_every_n_steps", "2"])
    last, out = _last_json_line(capsys)
    # the sides take turns every 2 steps: ours' 2 warm-up steps, the plain loop's, then 3 timed pairs of windows
    turns: list[list] = []
    for model in trained:
        if turns and turns[-1][0] == model:
            turns[-1][1] += 1
        else:
            turns.append([model, 1])
    ours, plain = turns[0][0], turns[1][0]
    assert ours != plain and turns == [[ours, 2], [plain, 2]] * 4
    assert last["mode"] == "interleaved" and last["window_pairs"] == 3
    assert last["ours_tokens_per_s"] > 0 and last["plain_tokens_per_s"] > 0 and 0 < last["ratio"] < math.inf
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
    # projected onto tiny.yaml's own schedule: 3 validations in 300 steps, a smaller share than 2 in 6
    assert last["config_schedule"] == {"max_steps": 300, "val_check_interval": 100}
    assert 0 < last["val_share_at_config_schedule"] < last["val_share_measured"]
    # each pause split: one text sample and one checkpoint callback call per validation (none for the sanity check)
    assert len(last["sample_s"]) == len(last["checkpoint_s"]) == 2
    assert all(0 < s + c < p for s, c, p in zip(last["sample_s"], last["checkpoint_s"], last["val_pauses_s"]))
    assert 0 < last["val_loop_share_measured"] < last["val_share_measured"]
    assert 0 < last["val_loop_share_at_config_schedule"] < last["val_share_at_config_schedule"]
    assert last["reached_target"]["step"] == 3  # any loss is below 10: reached at the first validation
    assert 0 < last["reached_target"]["train_s"] <= last["reached_target"]["wall_s"]
    assert 2.0 < last["final_val_loss"] < 4.5
    assert not list(benchmarks.iterdir())


def test_time_to_loss_runs_train_py_and_nanogpts_recipe_as_processes(benchmarks, capsys, monkeypatch,
                                                                      shakespeare_path):
    import timed_run

    # any loss is below 10: train.py stops at its first validation (step 5); the recipe (cut to 3 steps) reached it
    # at its step-0 evaluation
    monkeypatch.setattr(timed_run, "PLAIN_ARGS", ["--max-iters", "3"])
    timed_run.main(["--config", str(TINY_CONFIG), "--target-loss", "10", "--corpus", str(shakespeare_path),
                    "--trainer.val_check_interval", "5"])
    last, _ = _last_json_line(capsys)
    assert list(last)[:6] == ["target", "ours_s", "plain_s", "ratio", "ours_steps", "plain_steps"]
    assert last["target"] == 10 and last["ours_steps"] == 5 and last["plain_steps"] == 0
    assert last["ours_reached"] and last["plain_reached"] and last["ours_s"] > 0 and last["plain_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_s"] / last["plain_s"], rel=1e-2)
    assert not list(benchmarks.iterdir())


def test_nanogpts_recipe_trains_and_evaluates_like_its_train_py(benchmarks, capsys, shakespeare_path):
    import plain_loop

    plain_loop.main(["--corpus", str(shakespeare_path), "--max-iters", "4"])
    last, _ = _last_json_line(capsys)
    assert [e["step"] for e in last["evals"]] == [0, 4]  # every 250 steps from step 0, and at the end
    assert last["reached"] is None and last["steps"] == 4 and last["final_val"] == last["evals"][-1]["val"]
    assert last["evals"][-1]["val"] < last["evals"][0]["val"] < 4.3  # about ln(65) = 4.17 before training
    plain_loop.main(["--corpus", str(shakespeare_path), "--max-iters", "4", "--target-loss", "10"])
    last, _ = _last_json_line(capsys)
    assert last["reached"]["step"] == 0 and len(last["evals"]) == 1  # stopped at the first evaluation


def test_a_pause_less_its_parts_leaves_a_part_missing_at_some_validations_in(benchmarks):
    from timed_run import without

    assert without([5.0, 7.0], [1.0, 2.0], [0.5, 0.5]) == [3.5, 4.5]
    assert without([5.0, 7.0], [], [0.5, 0.5]) == [4.5, 6.5]  # no samples: nothing to take out for them
    assert without([], [], []) == []


@pytest.mark.timeout(3600)  # four processes; a loaded machine is slow, and no benchmark may time out for it
def test_gpu_suite_runs_every_benchmark_and_collects_their_figures(benchmarks, capsys, shakespeare_path):
    # the CPU twin of the one command a GPU runs: the same scripts, tiny config, no compile; a budget no machine
    # spends, so each benchmark's share of it never cuts a slow run short
    import gpu_suite

    out = benchmarks / "gpu"
    gpu_suite.main(["--smoke", "--out", str(out), "--corpus", str(shakespeare_path), "--budget-s", "36000"])
    last, printed = _last_json_line(capsys)
    assert json.loads((out / "results.json").read_text()) == last
    assert list(last) == ["lecture_ratio", "time_to_target", "time_to_target_muon", "gpt2_124m_mfu", "generate"]
    for name, entry in last.items():
        assert entry["status"] == "ok", (name, (out / f"{name}.log").read_text()[-2000:])
        assert entry["command"].startswith("python benchmarks/") and entry["result"], name
        assert f"{name}: ok in " in printed
    assert last["lecture_ratio"]["result"]["ratio"] > 0
    for name in ("time_to_target", "time_to_target_muon"):
        assert last[name]["result"]["reached_target"]["step"] == 2 and last[name]["result"]["steps"] == 2
    assert "--model.optimizer muon" in last["time_to_target_muon"]["command"]
    assert last["gpt2_124m_mfu"]["result"]["ours_mfu"] > 0
    assert last["generate"]["result"]["speedup"] > 0
    # the precision each ran in is recorded: a CPU trains in 32-true, and sampling always runs in fp32
    assert {name: entry["precision"] for name, entry in last.items()} == dict.fromkeys(last, "32-true")
    assert printed.startswith("cpu: precision 32-true (no GPU")
    for name in ("lecture_ratio", "time_to_target", "time_to_target_muon", "gpt2_124m_mfu"):
        assert "--trainer.precision 32-true" in last[name]["command"], name


def test_gpu_suite_dry_run_shows_the_precision_it_would_train_in(benchmarks, capsys):
    import gpu_suite

    gpu_suite.main(["--smoke", "--dry-run", "--precision", "16-mixed"])
    plan, printed = _last_json_line(capsys)
    assert plan["precision"] == "16-mixed" and plan["precision_reason"] == "--precision; default 32-true"
    assert list(plan["commands"]) == ["lecture_ratio", "time_to_target", "time_to_target_muon", "gpt2_124m_mfu",
                                      "generate"]
    assert all("--trainer.precision 16-mixed" in cmd for name, cmd in plan["commands"].items() if name != "generate")
    assert not (benchmarks / "gpu").exists() and list(benchmarks.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize(
    "name, capability, given, precision, peak",
    [
        ("Tesla T4", (7, 5), None, "16-mixed", 65.0),  # fp16 and its fp16 peak, never emulated bf16
        ("Tesla V100-SXM2-16GB", (7, 0), None, "16-mixed", 125.0),
        ("NVIDIA H100 80GB HBM3", (9, 0), None, "bf16-mixed", 989.5),
        ("NVIDIA L4", (8, 9), "32-true", "32-true", None),  # as given; the table has no fp32 peak
        ("NVIDIA GeForce RTX 5090", (12, 0), None, "bf16-mixed", None),  # not in the table: MFU without a peak
    ],
)
def test_gpu_suite_plans_each_gpus_precision_and_peak(benchmarks, name, capability, given, precision, peak):
    # the GPU half of the suite's set-up, as a pure function of what torch reports: testable on a CPU
    from gpu_suite import gpu_plan, suite

    plan = gpu_plan(name, capability, given)
    assert (plan["device"], plan["precision"], plan["peak_tflops"]) == (name, precision, peak)
    benches = {b.name: b for b in suite(False, plan["peak_tflops"], plan["precision"])}
    mfu = benches["gpt2_124m_mfu"]
    assert mfu.precision == precision and mfu.args[mfu.args.index("--trainer.precision") + 1] == precision
    assert ("--peak-tflops" in mfu.args) == (peak is not None)


def test_gpu_suite_refuses_a_benchmark_it_does_not_have(benchmarks, capsys):
    import gpu_suite

    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--smoke", "--out", str(benchmarks / "gpu"), "--only", "lecture_ratio", "mfu"])
    assert e.value.code == 2
    assert "no benchmark named ['mfu']" in capsys.readouterr().err


def test_step_windows_cut_the_training_clock_into_equal_steps():
    from timed_run import step_windows

    assert step_windows([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0], 2) == [3.0, 7.0, 11.0]
    assert step_windows([0.0, 1.0, 3.0, 6.0, 10.0, 15.0], 2) == [3.0, 7.0]  # a short last window is left out
    assert step_windows([0.0, 1.0], 2) == []


def test_the_run_timer_keeps_validation_out_of_its_step_clock(benchmarks, monkeypatch):
    # on a clock of its own that moves only when this test says (1 s a training step, 100 s a validation), the
    # timer must drop exactly each validation pause from its step clock, however fast or loaded this machine is
    import time
    from types import SimpleNamespace

    import lightning as L
    import throughput
    import timed_run

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timed_run, "time", SimpleNamespace(perf_counter=lambda: clock.now,
                                                           process_time=time.process_time))

    class Tick(L.Callback):  # after the timer in the callback list: its step starts, then a second passes
        def on_train_batch_start(self, trainer, *args):
            clock.now += 1.0

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                clock.now += 100.0

    args, config_args = throughput.parse_args(["--config", str(TINY_CONFIG), "--steps", "8", "--warmup", "2",
                                               "--device", "cpu", "--trainer.val_check_interval", "4"])
    cli = throughput.build_cli(args, config_args, str(benchmarks / "run"))
    timer = timed_run.RunTimer(warmup=2)
    cli.trainer.callbacks.extend([timer, Tick()])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert timer.val_pauses == [100.0, 100.0]  # after steps 4 and 8
    assert timer.timed_steps == 8 and timer.train_seconds == 8.0
    # the end of step 2 and of each timed step: one second apart, the pauses before steps 5 and 9 taken out
    assert [b - a for a, b in zip(timer.step_ends, timer.step_ends[1:])] == [1.0] * 8
    assert timer.total_seconds == 10 + 200  # 10 steps and 2 validations on the wall
    assert timed_run.step_windows(timer.step_ends, 4) == [4.0, 4.0]


def test_the_run_timer_clocks_every_step_without_warmup(benchmarks):
    import throughput
    from timed_run import RunTimer, step_windows

    args, config_args = throughput.parse_args(["--config", str(TINY_CONFIG), "--steps", "4", "--warmup", "0",
                                               "--device", "cpu"])
    cli = throughput.build_cli(args, config_args, str(benchmarks / "run"))
    timer = RunTimer(warmup=0)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert timer.timed_steps == 4 and len(timer.step_ends) == 5  # the start of step 1 and the end of each step
    assert len(step_windows(timer.step_ends, 2)) == 2
