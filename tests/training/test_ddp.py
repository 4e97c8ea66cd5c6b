"""Real DDP: train.py as 2 CPU processes over gloo, against 1-process runs of the same config.

Run them alone with `python -m pytest -m ddp`. Each run is the tiny config for a few dozen steps.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from nanogpt.data.datamodule import TextDataModule
from nanogpt.training.module import GPTModule
from tests.conftest import REPO, TINY_CONFIG, assert_user_error, read_scalars, run_script

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

# global batch 16 (the tiny config's), validation every 10 steps, every step logged; the cosine ends at step
# 30 in every run, so a 20-step run resumed to 30 follows the schedule of an uninterrupted 30-step run
COMMON = ["--config", TINY_CONFIG, "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
          "--model.decay_steps", "30"]
TWO_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _train(run: Path, *args, cwd: Path, cache: Path, check: bool = True, timeout: float = 600):
    # module fixtures run before the autouse fixture that points the data cache offline: pass it explicitly
    env = {"NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"}
    result = run_script("train.py", *COMMON, "--trainer.default_root_dir", run, *args, cwd=cwd, env=env,
                        timeout=timeout)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


class DDPProbe(L.Callback):
    """Records on each rank the settings of the real DistributedDataParallel wrapper and counts its all-reduces."""

    def __init__(self, out: str) -> None:
        self.out, self.allreduces = out, 0

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        self.settings = {"find_unused_parameters": ddp.find_unused_parameters,
                         "gradient_as_bucket_view": ddp.gradient_as_bucket_view}
        ddp.register_comm_hook(state=None, hook=self._count)

    def _count(self, state, bucket):
        self.allreduces += 1  # once per gradient bucket per synchronised backward
        return allreduce_hook(None, bucket)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {**self.settings, "allreduces": self.allreduces, "steps": trainer.global_step,
                  "accumulation": trainer.accumulate_grad_batches}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class CollectiveProbe(L.Callback):
    """Records on each rank every torch.distributed collective called from Python while training runs: its name,
    the optimizer step, and whether it used the default group (NCCL on GPUs, where reading a result back is a
    host-device sync) or a side group. DDP's own gradient all-reduce runs in C++ and is not seen."""

    NAMES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
             "reduce", "gather")

    def __init__(self, out: str) -> None:
        self.out, self.calls, self._originals = out, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        dist = torch.distributed
        for name in self.NAMES:
            original = self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._recording(trainer, name, original))

    def _recording(self, trainer, name, original):
        import inspect
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            group = signature.bind(*args, **kwargs).arguments.get("group")
            side = group is not None and group != torch.distributed.GroupMember.WORLD
            where = f"side:{torch.distributed.get_backend(group)}" if side else "default"
            self.calls.append((trainer.global_step, trainer.training, name, where))
            return original(*args, **kwargs)
        return call

    def _write(self, trainer) -> None:
        for name, original in self._originals.items():
            setattr(torch.distributed, name, original)
        record = {"steps": trainer.global_step, "calls": self.calls}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer)


class ShardedCheckpointWithNaN(L.Callback):
    """Builds the checkpoint as FSDP's full state dict does (the weights on rank 0 only, none on rank 1), with a NaN
    weight from step `step` on: only rank 0 can see it. Listed before FaultTolerance, so its check sees the result.
    The live weights stay finite: only the saved copy is poisoned."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_rank != 0:
            checkpoint["state_dict"] = {}
        elif trainer.global_step >= self.step:
            name = next(iter(checkpoint["state_dict"]))
            checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))


def test_non_finite_weights_seen_by_one_rank_stop_every_rank_without_a_hang(tmp_path, nanogpt_cache):
    """Under FSDP with a full state dict only rank 0 holds the weights when a checkpoint is built: the check for
    NaN or inf weights is agreed over the ranks, so rank 1 stops too instead of waiting in the save."""
    run = tmp_path / "run"
    callback = json.dumps({"class_path": "tests.training.test_ddp.ShardedCheckpointWithNaN", "init_args": {"step": 20}})
    result = _train(run, *TWO_PROCESSES, "--trainer.max_steps", "30", "--trainer.callbacks+", callback,
                    cwd=tmp_path, cache=nanogpt_cache, check=False, timeout=300)
    assert_user_error(result, "the weights became non-finite at step 20", "were not saved")
    assert _state(run)["global_step"] == 10  # the last good checkpoint is untouched


@pytest.fixture(scope="module")
def ddp_work(tmp_path_factory, nanogpt_cache):
    """A 2-process run of 20 steps in work/run (4 sequences per device x 2 accumulation micro-steps), and a
    copy of it in work/run20. test_ddp_run_resumes_where_it_stopped resumes work/run in place; the others
    read the copy. DDPProbe writes its records to work/probe.
    """
    work = tmp_path_factory.mktemp("ddp")
    (work / "probe").mkdir()
    probe = json.dumps({"class_path": "tests.training.test_ddp.DDPProbe", "init_args": {"out": str(work / "probe")}})
    result = _train(work / "run", *TWO_PROCESSES, "--data.micro_batch_size", "4", "--trainer.max_steps", "20",
                    "--trainer.callbacks+", probe, cwd=work, cache=nanogpt_cache)
    shutil.copytree(work / "run", work / "run20")
    return work, result


@pytest.fixture(scope="module")
def ddp_run(ddp_work):
    work, result = ddp_work
    return work / "run20", result


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, nanogpt_cache):
    """The same config on 1 process for 30 steps, with the default strategy: 16 sequences in one micro-step."""
    work = tmp_path_factory.mktemp("single")
    _train(work / "run", "--trainer.max_steps", "30", cwd=work, cache=nanogpt_cache)
    return work / "run"


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def _max_weight_diff(a: dict, b: dict) -> float:
    return max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])


def test_ddp_run_writes_one_set_of_checkpoints_and_one_tensorboard_run(ddp_run):
    run, result = ddp_run
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if "tfevents" in f]
    assert len(events) == 1 and "/" not in events[0], files  # one event file, straight in the run dir
    # one set: best, last and the kept step-N hard links of last (no "-v1" copies from a second writer)
    assert [f for f in files if f not in events] == ["checkpoints/best.ckpt", "checkpoints/last.ckpt",
                                                     "checkpoints/step-00000010.ckpt", "checkpoints/step-00000020.ckpt",
                                                     "config.yaml", "hparams.yaml"], files
    assert _state(run)["global_step"] == 20
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(20))  # each step once: rank 1 logs nothing
    assert [s for s, _ in scalars["val/loss"]] == [9, 19]
    assert {t: v[0][1] for t, v in scalars.items() if t.startswith("batch/")} == {
        "batch/global": 16, "batch/micro": 4, "batch/accumulation": 2, "batch/world_size": 2}
    output = result.stdout + result.stderr
    assert output.count("batch: global batch 16 = micro-batch 4 x 2 device(s) x 2 accumulation step(s)") == 1
    assert output.count("Total params") == 1  # the model summary, like all progress output, from rank 0 only


def test_ddp_runs_with_the_free_settings_and_no_allreduce_on_accumulation_micro_steps(ddp_work):
    work, _ = ddp_work
    records = [json.loads((work / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    for record in records:
        assert record["find_unused_parameters"] is False and record["gradient_as_bucket_view"] is True
        assert record["accumulation"] == 2 and record["steps"] == 20
        # 40 backward passes per rank, but gradients are all-reduced only on the 20 that end an optimizer
        # step (the tiny model's gradients fit one bucket): the micro-steps between run under no_sync
        assert record["allreduces"] == 20


def test_two_processes_train_like_one_with_the_same_global_batch(ddp_run, single_run):
    two, one = read_scalars(ddp_run[0]), read_scalars(single_run)
    assert {t: v[0][1] for t, v in one.items() if t.startswith("batch/")} == {
        "batch/global": 16, "batch/micro": 16, "batch/accumulation": 1, "batch/world_size": 1}
    # same seed, so the same initial weights; the two ranks' micro-batches make up the 1-process batch,
    # so the first-step losses agree and training stays together
    assert two["train/loss"][0][1] == pytest.approx(one["train/loss"][0][1], abs=1e-5)
    assert [s for s, _ in two["train/loss"]] == list(range(20))  # logged per optimizer step, not micro-step
    # the global batch and the tokens trained are those of one process, not 2 devices x 2 micro-steps more
    assert two["batch/global"] == one["batch/global"] == [(0, 16)]
    assert two["train/tokens_seen"] == one["train/tokens_seen"][:20] == [(s, (s + 1) * 16 * 32) for s in range(20)]
    for (s2, v2), (s1, v1) in zip(two["train/loss"], one["train/loss"][:20]):
        assert s1 == s2 and v2 == pytest.approx(v1, abs=1e-4)
    assert [v for _, v in two["train/lr"]] == pytest.approx([v for _, v in one["train/lr"][:20]])  # same schedule
    assert [s for s, _ in two["val/loss"]] == [9, 19]  # val_check_interval stays in optimizer steps
    assert two["val/loss"][-1][1] == pytest.approx(dict(one["val/loss"])[19], abs=1e-4)


def validate(ckpt: str, devices: int, strategy: str) -> dict:
    """val metrics of a checkpoint from a real Trainer.validate on `devices` CPU processes (rank 0's result)."""
    model = GPTModule.load_from_checkpoint(ckpt, map_location="cpu")
    # 63 blocks: 32 on rank 0 and 31 on rank 1, in micro-batches of 8 (16 on one process)
    data = TextDataModule(block_size=model.hparams.block_size, batch_size=16, val_blocks=63)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, datamodule=data)
    return metrics


# the 2-process side: a script the DDP launcher can start again as rank 1
VALIDATE = """
import json, sys
from tests.training.test_ddp import validate
metrics = validate(sys.argv[1], 2, "ddp")
if int(__import__("os").environ.get("LOCAL_RANK", 0)) == 0:
    open(sys.argv[2], "w").write(json.dumps(metrics))
"""


def test_val_loss_on_two_processes_equals_one_process_on_the_same_checkpoint(ddp_run, tmp_path):
    ckpt = str(ddp_run[0] / "checkpoints" / "last.ckpt")
    script, out = tmp_path / "validate.py", tmp_path / "val2.json"
    script.write_text(VALIDATE, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), ckpt, str(out)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())["val/loss"]
    one = validate(ckpt, 1, "auto")["val/loss"]  # in this process
    assert abs(two - one) < 1e-5, (one, two)
    assert 2.5 < one < 4.2  # a real loss of the trained model, not a constant


def test_ddp_run_resumes_where_it_stopped(ddp_work, single_run, nanogpt_cache):
    work, _ = ddp_work
    run = work / "run"
    _train(run, *TWO_PROCESSES, "--data.micro_batch_size", "4", "--trainer.max_steps", "30", "--ckpt_path", "last",
           cwd=work, cache=nanogpt_cache)
    state = _state(run)
    assert state["global_step"] == 30
    # keep_last_k=2 step checkpoints beside best and last, and no second set
    assert sorted(p.name for p in run.rglob("*.ckpt")) == ["best.ckpt", "last.ckpt", "step-00000020.ckpt",
                                                          "step-00000030.ckpt"]
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(30))  # continues at step 20, no step twice
    # 20 steps on 2 processes + 10 resumed on 2 processes = 30 uninterrupted steps on 1 process
    one = read_scalars(single_run)
    assert scalars["train/loss"][20][1] == pytest.approx(one["train/loss"][20][1], abs=1e-4)
    assert scalars["val/loss"][-1] == (29, pytest.approx(one["val/loss"][-1][1], abs=1e-4))
    assert _max_weight_diff(state, _state(single_run)) < 1e-3


def test_a_ddp_run_resumes_on_another_device_count(ddp_run, single_run, nanogpt_cache, tmp_path):
    # the global batch of a step does not depend on the device count: 20 steps on 2 processes (micro-batches of
    # 4, 2 accumulation steps), resumed on 1 process (16 in one micro-step) to 30, train like 30 steps on 1 process
    run = tmp_path / "run"
    shutil.copytree(ddp_run[0], run)
    result = _train(run, "--trainer.max_steps", "30", "--ckpt_path", "last", cwd=tmp_path, cache=nanogpt_cache)
    assert "RNG states for 2 processes" in result.stderr  # said, since dropout masks would differ (tiny: dropout 0)
    state = _state(run)
    assert state["global_step"] == 30
    scalars, one = read_scalars(run), read_scalars(single_run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(30))  # continues at step 20, no step twice
    for (s, v), (s1, v1) in zip(scalars["train/loss"][20:], one["train/loss"][20:30]):
        assert s == s1 and v == pytest.approx(v1, abs=1e-4)
    assert scalars["val/loss"][-1] == (29, pytest.approx(one["val/loss"][-1][1], abs=1e-4))
    assert _max_weight_diff(state, _state(single_run)) < 1e-3


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


@contextlib.contextmanager
def _training_in_background(run: Path, *args: str, until: str):
    """A 2-process train.py run of endless steps, yielded as (launcher, [rank 1's pid]) once run/checkpoints/until
    exists (training under way on both ranks); any of its processes still alive at the end is killed."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *map(str, COMMON), *TWO_PROCESSES, "--trainer.max_steps", "100000",
         *args, "--trainer.default_root_dir", str(run)],
        cwd=run.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    ranks = []
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / until).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        ranks = _children(proc.pid)
        assert len(ranks) == 1  # the launcher is rank 0 and started rank 1
        yield proc, ranks
    finally:
        for pid in [proc.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_sigterm_to_the_launcher_stops_every_rank_without_a_hang(tmp_path):
    run = tmp_path / "run"
    with _training_in_background(run, until="last.ckpt") as (proc, ranks):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)  # seconds on a quiet machine; generous for a loaded CI box
        deadline = time.monotonic() + 30
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(r) for r in ranks), "rank 1 outlived the launcher"
        # the stop is a preemption, not a crash: the finished step is checkpointed on every rank's say-so
        assert proc.returncode == 143
        assert "resume with --ckpt_path last" in proc.stderr.read()
    # the run's checkpoint is intact and resumable
    assert _state(run)["global_step"] >= 10


def test_sigterm_to_rank_1_alone_stops_both_ranks_at_one_step_with_no_per_step_sync(tmp_path):
    """The stop vote runs on a side gloo group, and Lightning's per-micro-step SIGTERM broadcast on the default
    group is off; a signal that reaches rank 1 alone (which that broadcast from rank 0 could not carry) still
    stops both ranks at the same step, checkpointed."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    callback = json.dumps({"class_path": "tests.training.test_ddp.CollectiveProbe", "init_args": {"out": str(probe)}})
    with _training_in_background(run, "--data.micro_batch_size", "4", "--trainer.log_every_n_steps", "5",
                                 "--trainer.callbacks+", callback, until="step-00000020.ckpt") as (proc, ranks):
        os.kill(ranks[0], signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
        proc.wait(timeout=120)
        assert proc.returncode == 143, proc.stderr.read()[-3000:]
        assert "resume with --ckpt_path last" in proc.stderr.read()
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    stop = records[0]["steps"]
    assert records[1]["steps"] == stop and stop >= 20  # both ranks stopped after the same step ...
    assert _state(run)["global_step"] == stop  # ... and that step is the checkpoint
    # a call's step is global_step when it was made: optimizer step n (from 1) is n - 1 in its training_step
    # and n after it, so the logging steps n = 5, 10, ... show as 4, 5, 9, 10, ...
    logging = {s for s in range(stop + 1) if s % 5 in (0, 4)}
    for record in records:
        training = [(step, name, where) for step, in_training, name, where in record["calls"] if in_training]
        quiet = [call for call in training if call[0] not in logging and call[0] < stop]
        # every collective of a step that neither logs nor stops is the vote on the side gloo group: nothing on the
        # default group (before: Lightning's SIGTERM broadcast every micro-step and a stop all-reduce every step)
        assert quiet and {(name, where) for _, name, where in quiet} == {("all_reduce", "side:gloo")}, quiet
        assert sorted({step for step, _, _ in quiet}) == [s for s in range(1, stop) if s not in logging]  # every step
        # a logging step makes three collectives on the default group: it all-reduces the loss of its last
        # micro-batch (not of each of the 2) and the non-finite check, and all-gathers the ranks' step losses for the
        # spike check (nanogpt/training/rollback.py), with no barrier before any (on NCCL a barrier is a sync of its
        # own). Steps 10, 20, ... also save a checkpoint, whose own collectives (the save's barrier, the weights
        # check) come on top: the logging steps between them are the ones that show what logging costs
        for first in range(5, stop - 1, 10):  # optimizer step `first` shows as steps first - 1 and first
            logged = [name for step, name, where in training if step in (first - 1, first) and where == "default"]
            assert sorted(logged) == ["all_gather", "all_reduce", "all_reduce"], (first, logged)
