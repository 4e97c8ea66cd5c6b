"""Exact resume and fault tolerance, on real training processes: interruptions, signals, kill -9, NaN, bad files."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanogpt.io import atomic_save, check_resumable, pick_resume_checkpoint, read_checkpoint, step_checkpoint_name
from nanogpt.training.checkpointing import AtomicCheckpointIO
from nanogpt.training.resume import config_differences
from nanogpt.errors import NanoGPTError
from tests.conftest import REPO, TINY_CONFIG, assert_user_error, read_scalars, run_script

OFFLINE_URL = "http://127.0.0.1:9/input.txt"
MAX_STEPS = 60
# dropout on, validations at steps 25 and 50, step checkpoints every 10, a schedule that does not depend on max_steps
ARGS = [
    "--config", TINY_CONFIG,
    "--trainer.val_check_interval", "25",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_steps", "10",
    "--model.dropout", "0.1",
    "--model.decay_steps", str(MAX_STEPS),
]


class PoisonWeights(Callback):
    """Test helper loaded by train.py through --config: fills a weight (or a gradient) with NaN at one step.

    when="start": before that step's forward, so its loss is NaN; when="end": after that step's update, so the
    weights are NaN while the step's loss was finite; when="grad": a gradient after that step's backward, so the
    loss and the weights are finite and only the update would have spread the NaN.
    """

    def __init__(self, step: int, when: str = "start") -> None:
        self.step, self.when = step, when

    def _poison(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end" and trainer.global_step == self.step + 1:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.when == "grad" and trainer.global_step == self.step:
            next(pl_module.parameters()).grad.fill_(float("nan"))


class Payload:
    """A pickle whose loading would create a file: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _env(cache: Path) -> dict:
    return {"NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": OFFLINE_URL}


def train(run: Path, cache: Path, *extra, max_steps: int = MAX_STEPS, resume: bool = False):
    args = [*ARGS, "--trainer.max_steps", max_steps, "--trainer.default_root_dir", run, *extra]
    if resume:
        args += ["--ckpt_path", "last"]
    return run_script("train.py", *args, cwd=run.parent, env=_env(cache))


def start_training(run: Path, cache: Path, *extra, resume: bool = False, max_steps: int = MAX_STEPS) -> subprocess.Popen:
    args = [*ARGS, "--trainer.max_steps", max_steps, "--trainer.default_root_dir", run, *extra]
    if resume:
        args += ["--ckpt_path", "last"]
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *map(str, args)],
        cwd=run.parent,
        env={**os.environ, **_env(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # every checkpoint we write loads this way


def assert_same_training(straight: Path, resumed: Path) -> None:
    """Bit-identical per-step train/loss, no duplicate steps, and identical final weights and optimizer state."""
    a, b = read_scalars(straight), read_scalars(resumed)
    steps = [s for s, _ in b["train/loss"]]
    assert steps == list(range(MAX_STEPS)), steps  # every step once, in order: no duplicates, no gaps
    assert b["train/loss"] == a["train/loss"]
    assert b["val/loss"] == a["val/loss"] and [s for s, _ in b["val/loss"]] == [24, 49]
    ca, cb = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert cb["global_step"] == ca["global_step"] == MAX_STEPS
    for name, tensor in ca["state_dict"].items():
        assert torch.equal(tensor, cb["state_dict"][name]), name
    for state_a, state_b in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, nanogpt_cache) -> Path:
    """An uninterrupted 60-step run: the reference every interrupted run must match bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = train(run, nanogpt_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


# ---- 1. exact resume --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("first_async", ["true", "false"], ids=["async", "sync-then-async"])
def test_stop_and_resume_between_validations_is_bit_exact(straight, nanogpt_cache, tmp_path, first_async):
    # the straight run saved in the background (the default); the first half here in either way
    run = tmp_path / "run"
    first = train(run, nanogpt_cache, "--checkpoint.async_save", first_async, max_steps=35)  # between 25 and 50
    assert first.returncode == 0, first.stderr[-3000:]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 35
    second = train(run, nanogpt_cache, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_training(straight, run)
    ckpt = load(run / "checkpoints" / "last.ckpt")
    assert len(ckpt["rng_states"]) == 1 and set(ckpt["rng_states"][0]) == {"torch", "cuda", "numpy", "python"}


@pytest.mark.slow
def test_a_run_ending_at_a_validation_resumes_from_its_last_checkpoint(straight, nanogpt_cache, tmp_path):
    # the run ends at step 25, whose validation improves val/loss: best.ckpt and last.ckpt both hold step 25,
    # last.ckpt written after the validation (with its score); resuming from it continues as if never stopped
    run = tmp_path / "run"
    first = train(run, nanogpt_cache, max_steps=25)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert load(ckpts / "best.ckpt")["global_step"] == load(ckpts / "last.ckpt")["global_step"] == 25
    second = train(run, nanogpt_cache, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_training(straight, run)
    # the callback state continued the same files: no last-v1.ckpt or best-v1.ckpt beside them
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step-00000050.ckpt", "step-00000060.ckpt"]


# ---- 2. atomic checkpoints, every_n_steps, keep last K ----------------------------------------------------------


@pytest.mark.slow
def test_step_checkpoints_are_kept_for_the_last_k_steps(straight):
    ckpts = straight / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "best.ckpt", "last.ckpt", "step-00000050.ckpt", "step-00000060.ckpt"
    ]  # keep_last_k=2, no temp files left
    # one write per save: last.ckpt is step 60's file; best.ckpt the file of the validation at 50, which
    # step-00000050.ckpt (written just before it, at the same step) now names too: two files' worth of data
    inode = {p.name: p.stat().st_ino for p in ckpts.iterdir()}
    assert inode["last.ckpt"] == inode["step-00000060.ckpt"] and inode["best.ckpt"] == inode["step-00000050.ckpt"]
    assert len(set(inode.values())) == 2, inode
    assert load(ckpts / "step-00000050.ckpt")["global_step"] == 50
    assert load(ckpts / "best.ckpt")["global_step"] == 50  # judged at the validation of step 50
    assert load(ckpts / "step-00000060.ckpt")["global_step"] == load(ckpts / "last.ckpt")["global_step"] == 60
    hparams = load(ckpts / "last.ckpt")["hyper_parameters"]
    assert not any(k.startswith("_") for k in hparams), hparams  # no import paths such as _instantiator
    assert "_instantiator" not in (straight / "hparams.yaml").read_text()


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    class Unsaveable:  # torch.save raises half way through writing the file
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "big": torch.zeros(10_000), "x": Unsaveable()}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temp file is gone too
    assert read_checkpoint(target)["global_step"] == 1


# ---- 3. signals ---------------------------------------------------------------------------------------------------


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_and_exits_with_its_code(straight, nanogpt_cache, tmp_path, signum, code):
    run = tmp_path / "run"
    proc = start_training(run, nanogpt_cache)
    _wait_for(run / "checkpoints" / "step-00000010.ckpt", proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = load(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 10 <= stopped < MAX_STEPS
    assert f"stopped: {signum.name} received: stopped after step {stopped}" in stderr
    if signum == signal.SIGTERM:  # the preempted run resumes to the very same result
        result = train(run, nanogpt_cache, resume=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_training(straight, run)
    else:
        check_resumable(run / "checkpoints" / "last.ckpt")


# ---- 4. non-finite loss -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start", "end"], ids=["nan-loss", "nan-weights"])
def test_nan_stops_the_run_and_never_reaches_a_checkpoint(nanogpt_cache, tmp_path, when):
    poison = tmp_path / "poison.yaml"
    poison.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.training.test_resume.PoisonWeights\n"
        f"      init_args: {{step: 29, when: {when}}}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    result = train(run, nanogpt_cache, "--config", poison, "--fault.on_bad_step", "stop")  # not a rollback
    if when == "start":  # the loss of step 29 is NaN: stopped before its backward pass
        assert_user_error(result, "training loss or its gradients became NaN or inf at step 29", "--ckpt_path last")
    else:  # the step-30 update gave NaN weights: refused at the step-30 checkpoint
        assert_user_error(result, "weights became non-finite at step 30", "were not saved")
    ckpts = run / "checkpoints"
    assert load(ckpts / "last.ckpt")["global_step"] == 25  # written at the validation of step 25
    assert load(ckpts / "best.ckpt")["global_step"] == 25
    for path in ckpts.glob("*.ckpt"):
        assert all(torch.isfinite(t).all() for t in load(path)["state_dict"].values()), path
    if when == "start":  # the run still resumes from its last good checkpoint, without the poison
        resumed = train(run, nanogpt_cache, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert load(ckpts / "last.ckpt")["global_step"] == MAX_STEPS


@pytest.mark.slow
def test_a_nan_gradient_stops_the_run_before_it_reaches_the_weights_or_a_checkpoint(nanogpt_cache, tmp_path):
    # on a CPU the flag is read at once, so the run stops in step 21, before its update; on a GPU the fused AdamW
    # skips step 21 on the device and the flag is read at the next log step or checkpoint (the next test). Either
    # way the validation and checkpoint of step 25 never come
    poison = tmp_path / "poison.yaml"
    poison.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.training.test_resume.PoisonWeights\n"
        "      init_args: {step: 21, when: grad}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    result = train(run, nanogpt_cache, "--config", poison, "--trainer.log_every_n_steps", "10",
                   "--fault.on_bad_step", "stop")
    assert_user_error(result, "became NaN or inf at step 21", "no checkpoint was written after it")
    ckpts = run / "checkpoints"
    assert load(ckpts / "last.ckpt")["global_step"] == 20  # the step checkpoint before the bad step
    assert not (ckpts / "best.ckpt").exists()  # the validation at step 25 came after it: nothing saved
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"last.ckpt", step_checkpoint_name(10), step_checkpoint_name(20)}
    for path in ckpts.glob("*.ckpt"):
        assert all(torch.isfinite(t).all() for t in load(path)["state_dict"].values()), path


@pytest.mark.parametrize("on_device", [True, False], ids=["skip-on-device", "check-at-once"])
def test_fused_adamw_skips_a_step_with_nan_gradients_on_the_device(tmp_path, shakespeare_text, on_device):
    """In process, every step: the poisoned step leaves weights and AdamW state as they were; the others move them.

    skip-on-device is what a GPU runs (the CPU twin of it); check-at-once is the CPU's default.
    """
    import lightning as L

    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.training.fault import FaultTolerance, NonFiniteGuard, NonFiniteLossError
    from nanogpt.training.module import GPTModule

    class Watch(Callback):
        def __init__(self):
            self.changed = {}  # step -> whether the weights changed over it

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = list(pl_module.parameters())
            self.changed[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(self.before, after))
            self.adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}

    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=16, batch_size=4, val_blocks=4, cache_dir=str(tmp_path / "c"))
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    assert model.nonfinite.skip_on_device is None  # the default: on the device wherever that is not the CPU
    model.nonfinite = NonFiniteGuard(skip_on_device=on_device)
    watch = Watch()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, log_every_n_steps=5, limit_val_batches=0, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path,
        gradient_clip_val=1.0, callbacks=[PoisonWeights(step=3, when="grad"), watch, FaultTolerance()],
    )
    with pytest.raises(NonFiniteLossError, match="at step 3;"):
        trainer.fit(model, datamodule=dm)
    assert trainer.optimizers[0].defaults["fused"]  # the fused AdamW, on the CPU too
    if on_device:
        assert watch.changed == {0: True, 1: True, 2: True, 3: False, 4: True}  # found at the log step after step 4
        assert watch.adam_steps == {4}  # five steps taken, one skipped: AdamW's step count did not move either
    else:
        assert watch.changed == {0: True, 1: True, 2: True}  # stopped within step 3, before its update
        assert watch.adam_steps == {3}
        assert not hasattr(trainer.optimizers[0], "found_inf")  # the optimizer was never asked to skip
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("on_device", [True, None], ids=["device-flags", "host-floats"])
def test_the_guard_finds_the_first_non_finite_loss_the_same_either_way(on_device):
    """A GPU keeps the loss flags on the device; a CPU reads floats. Both report the first bad step, at the check.

    An inf loss with finite gradients (a -inf logit at the target) leaves the update alone: the step is reported at
    the next check, not at once, since under DDP only one rank may have seen it (bad_step agrees on it over ranks).
    """
    from types import SimpleNamespace

    from nanogpt.training.fault import NonFiniteGuard, NonFiniteLossError

    guard, trainer = NonFiniteGuard(skip_on_device=on_device), SimpleNamespace(world_size=1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    assert guard.bad_step(trainer) is None  # nothing seen yet
    for step, loss in enumerate([2.0, 1.9, 1.8, float("inf"), 1.7, float("nan"), 1.6]):
        guard.see_loss(torch.tensor(1.5))  # two micro-batches a step: the second one's loss decides here
        guard.see_loss(torch.tensor(loss))
        guard.see_step(optimizer, torch.tensor(0.5), step)
        if step == 2:
            assert guard.bad_step(trainer) is None
    assert guard.bad_step(trainer) == 3
    assert guard.bad_step(trainer) == 3  # the first bad step stays the answer
    nan_norm = torch.tensor(float("nan"))
    if on_device:  # the fused AdamW is told to skip the update; the step is reported at the next check
        guard.see_step(optimizer, nan_norm, 7)
        assert float(optimizer.found_inf) == 1.0
    else:  # read at once: the step stops before its update
        with pytest.raises(NonFiniteLossError, match="at step 7;"):
            guard.see_step(optimizer, nan_norm, 7)
        assert not hasattr(optimizer, "found_inf")


# ---- 5. kill -9 at random moments ---------------------------------------------------------------------------------


class _Progress:
    """The last step a --quiet run printed ("step N/M | ..."), read from its stdout as the lines come."""

    def __init__(self, proc: subprocess.Popen, target: int) -> None:
        self.step, self.target, self.reached = -1, target, threading.Event()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out) -> None:
        for line in out:
            m = re.match(r"step (\d+)/", line)
            if m:
                self.step = int(m.group(1))
                if self.step >= self.target:
                    self.reached.set()
        self.reached.set()  # the process ended


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_run(nanogpt_cache, tmp_path):
    """Five kill -9s, each at a random point of one start's progress (counted in steps, not seconds, so a faster
    machine sees the same kills); every time a good checkpoint remains, and the run then finishes as if whole."""
    seed = int(os.environ.get("NANOGPT_KILL_SEED", time.time_ns() % 10_000))  # printed on failure to replay it
    rng = random.Random(seed)
    run, steps = tmp_path / "run", 80
    ckpts = run / "checkpoints"
    extra = ["--checkpoint.every_n_steps", "5"]  # frequent saves, so kills land in saves as well as in steps
    kills: list[tuple[str, int]] = []
    for attempt in range(5):
        resume = (ckpts / "last.ckpt").exists()
        start = _step_or(ckpts / "last.ckpt", 0)
        # start-up: the first printed step at the latest (anywhere in imports, data loading, restoring); else
        # after 1 to 12 steps: with saves every 5, as often inside a save as between them. At most 12 steps
        # a start, so five starts never reach the end of the 80
        moment = rng.choice(["startup", "training"])
        target = start + (1 if moment == "startup" else rng.randint(1, 12))
        with open(tmp_path / f"stderr{attempt}.txt", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *map(str, ARGS), "--trainer.max_steps", str(steps),
                 "--trainer.default_root_dir", str(run), "--quiet", *extra, *(["--ckpt_path", "last"] if resume else [])],
                cwd=run.parent, env={**os.environ, **_env(nanogpt_cache)}, stdout=subprocess.PIPE, stderr=err,
                text=True,
            )
        progress = _Progress(proc, target)
        if moment == "startup":
            progress.reached.wait(rng.uniform(0.0, 3.0))
        else:
            assert progress.reached.wait(300), f"seed {seed}: no progress to step {target}"
        assert proc.poll() is None, f"seed {seed}: {(tmp_path / f'stderr{attempt}.txt').read_text()[-3000:]}"
        proc.kill()
        proc.wait()
        kills.append((moment, progress.step))
        if (ckpts / "last.ckpt").exists():  # always a good checkpoint to resume, never a half-written one
            check_resumable(pick_resume_checkpoint(ckpts, log=lambda message: None))
    # (if every kill came before the first save, there is nothing to resume: the run starts afresh in its dir)
    result = train(run, nanogpt_cache, *extra, resume=(ckpts / "last.ckpt").exists(), max_steps=steps)
    assert result.returncode == 0, f"seed {seed}, kills {kills}: {result.stderr[-3000:]}"
    assert load(ckpts / "last.ckpt")["global_step"] == steps
    logged = [s for s, _ in read_scalars(run)["train/loss"]]
    assert len(logged) == len(set(logged)) and max(logged) == steps - 1, f"seed {seed}, kills {kills}: {logged}"
    assert not list(ckpts.glob(".*.tmp"))
    from nanogpt.io import load_checkpoint

    load_checkpoint(str(run))  # and the run samples


def _step_or(path: Path, default: int) -> int:
    try:
        return int(torch.load(path, weights_only=True, mmap=True)["global_step"])
    except Exception:
        return default


# ---- 6. corrupt, truncated, empty -------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"this is not a checkpoint" * 100)


@pytest.mark.slow
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_damaged_checkpoint_is_named_and_never_loaded(straight, how, mmap, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((straight / "checkpoints" / "last.ckpt").read_bytes())
    _damage(bad, how)
    with pytest.raises(NanoGPTError, match=f"{bad}.*(empty|corrupt or truncated)"):
        read_checkpoint(bad, mmap=mmap)


@pytest.mark.slow
def test_checking_a_checkpoint_maps_it_and_still_reads_the_old_format(straight, tmp_path, monkeypatch):
    loads = []  # the mmap argument of each torch.load the check makes
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("mmap")) or real_load(*a, **kw))
    good = straight / "checkpoints" / "last.ckpt"
    ckpt = check_resumable(good)
    assert loads == [True]  # memory-mapped: only the weights it checks are read, and resume reads the file once
    old = tmp_path / "old.ckpt"  # torch's pre-1.6 format, which mmap cannot map: then it is read whole
    torch.save(real_load(good, weights_only=True), old, _use_new_zipfile_serialization=False)
    loads.clear()
    assert check_resumable(old)["global_step"] == ckpt["global_step"]
    assert loads == [True, False]


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_good_checkpoint_and_says_so(straight, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for p in (straight / "checkpoints").iterdir():
        (ckpts / p.name).write_bytes(p.read_bytes())
    _damage(ckpts / "last.ckpt", "truncated")
    messages = []
    assert pick_resume_checkpoint(ckpts, log=messages.append) == ckpts / "step-00000060.ckpt"
    assert "last.ckpt is corrupt or truncated" in messages[0] and "step-00000060.ckpt (step 60)" in messages[0]
    _damage(ckpts / "step-00000060.ckpt", "empty")
    assert pick_resume_checkpoint(ckpts, log=messages.append) == ckpts / "step-00000050.ckpt"
    _damage(ckpts / "step-00000050.ckpt", "garbage")
    with pytest.raises(NanoGPTError, match="no checkpoint in .* can be resumed: .*last.ckpt.*step-00000060.ckpt.*50"):
        pick_resume_checkpoint(ckpts, log=messages.append)


@pytest.mark.slow
def test_train_py_reports_damaged_checkpoints_in_one_line(straight, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # no older one to fall back to
    result = run_script("train.py", *ARGS, "--trainer.default_root_dir", run, "--ckpt_path", "last", cwd=tmp_path)
    assert_user_error(result, "last.ckpt is empty", "can be resumed")
    assert not (run / "events.out.tfevents").exists() and not list(run.glob("events*"))  # nothing started


# ---- 7. untrusted checkpoints --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_with_a_code_payload_is_refused_by_resume_and_sample(straight, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = load(straight / "checkpoints" / "last.ckpt")
    ckpt["extra"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    raw = tmp_path / "evil_raw.ckpt"  # a legacy plain pickle, not a zip
    raw.write_bytes(pickle.dumps({"state_dict": {}, "global_step": 1, "x": Payload(marker)}))
    for path in (evil, raw):
        result = run_script("train.py", *ARGS, "--trainer.default_root_dir", tmp_path / "run", "--ckpt_path", path,
                            cwd=tmp_path)
        assert_user_error(result, f"refusing to load {path}")
    result = run_script("sample.py", "--ckpt", evil, "--max_new_tokens", "5", cwd=tmp_path)
    assert_user_error(result, "refusing to load", "evil.ckpt")
    assert not marker.exists()  # the payload never ran
    # the unsafe loader would run it: the test's payload is real
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ---- 8. changed config on resume --------------------------------------------------------------------------------


def test_config_differences_list_each_changed_field():
    stored = {"n_layer": 2, "n_embd": 64, "learning_rate": 3e-3}
    assert config_differences(stored, {"n_layer": 3, "n_embd": 64}, ("n_layer", "n_embd")) == ["n_layer: 2 -> 3"]


@pytest.mark.slow
def test_resuming_with_another_model_shape_lists_the_fields(straight, nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((straight / "checkpoints" / "last.ckpt").read_bytes())
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    result = train(run, nanogpt_cache, "--model.n_layer", "3", "--model.n_embd", "96", "--model.learning_rate", "1e-3",
                   resume=True, max_steps=80)
    assert_user_error(result, "n_layer: 2 -> 3", "n_embd: 64 -> 96")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    result = train(run, nanogpt_cache, "--model.learning_rate", "1e-3", resume=True, max_steps=80)
    assert_user_error(result, "cannot change on resume", "learning_rate: 0.003 -> 0.001")


# ---- 9. a moved or copied run dir -------------------------------------------------------------------------------


def _files(run: Path) -> dict[str, str]:
    """Every file under run, by relative path, with its sha256: equal snapshots mean not a byte changed."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def _checkpoint_state(path: Path) -> dict:
    """The state of best.ckpt's checkpoint callback stored in a checkpoint: paths, best score."""
    (state,) = [v for k, v in load(path)["callbacks"].items() if k.startswith(BEST_STATE)]
    return state


BEST_STATE = "RunCheckpoint{'monitor': 'val/loss'"  # the key of best.ckpt's callback in a checkpoint's callbacks


def _versioned(*dirs: Path) -> list[Path]:
    """best-v1.ckpt, last-v2.ckpt, ...: what Lightning writes beside a file it does not think is its own."""
    return [p for d in dirs for p in d.rglob("*.ckpt") if re.search(r"-v\d+\.ckpt$", p.name)]


def _claim_best_score(ckpt_path: Path, score: float) -> None:
    """Rewrites the best val/loss stored in a checkpoint: a score no validation of this tiny run reaches, so a
    resumed run that kept it must never replace best.ckpt (its real validations only improve on the stored one)."""
    ckpt = load(ckpt_path)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith(BEST_STATE)]
    state = ckpt["callbacks"][key]
    state["best_model_score"] = torch.tensor(score)
    state["kth_value"] = torch.tensor(score)
    state["best_k_models"] = {path: torch.tensor(score) for path in state["best_k_models"]}
    torch.save(ckpt, ckpt_path)


@pytest.mark.slow
def test_a_copied_run_dir_resumes_into_its_own_checkpoints(straight, nanogpt_cache, tmp_path):
    original = _files(straight)
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)  # cp -r
    result = train(copy, nanogpt_cache, resume=True, max_steps=110)  # validations at 75 and 100
    assert result.returncode == 0, result.stderr[-3000:]

    ckpts = copy / "checkpoints"
    assert not _versioned(straight, copy)
    # last.ckpt and best.ckpt continued, the step checkpoints made here: keep_last_k 2 dropped the copied 50 and 60
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "best.ckpt", "last.ckpt", "step-00000100.ckpt", "step-00000110.ckpt"
    ]
    assert load(ckpts / "last.ckpt")["global_step"] == 110
    assert load(ckpts / "step-00000110.ckpt")["global_step"] == 110
    assert load(ckpts / "step-00000100.ckpt")["global_step"] == 100
    # the best over the whole run, the two validations before the copy included, is best.ckpt's
    val = read_scalars(copy)["val/loss"]
    assert [s for s, _ in val] == [24, 49, 74, 99]
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    assert load(ckpts / "best.ckpt")["global_step"] == best_step + 1
    state = _checkpoint_state(ckpts / "last.ckpt")
    assert float(state["best_model_score"]) == pytest.approx(best_loss, abs=1e-6)
    # every stored path is this run's: a later resume of the copy never reaches back into the original
    paths = [state["dirpath"], state["best_model_path"], state["kth_best_model_path"], *state["best_k_models"]]
    assert all(Path(p).parent == ckpts.resolve() or p == str(ckpts.resolve()) for p in paths), paths
    assert _files(straight) == original  # the original run is untouched, byte for byte


@pytest.mark.slow
def test_a_moved_run_dir_keeps_its_best_score(straight, nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _claim_best_score(run / "checkpoints" / "last.ckpt", 0.5)
    best = (run / "checkpoints" / "best.ckpt").read_bytes()
    moved = tmp_path / "moved"
    run.rename(moved)  # mv
    result = train(moved, nanogpt_cache, resume=True, max_steps=85)  # one validation, at 75, far above 0.5
    assert result.returncode == 0, result.stderr[-3000:]

    ckpts = moved / "checkpoints"
    assert not _versioned(tmp_path)
    assert (ckpts / "best.ckpt").read_bytes() == best  # not replaced by a worse val/loss
    assert load(ckpts / "last.ckpt")["global_step"] == 85
    state = _checkpoint_state(ckpts / "last.ckpt")
    assert float(state["best_model_score"]) == 0.5
    assert state["best_model_path"] == str((ckpts / "best.ckpt").resolve())
    assert not run.exists()  # nothing was written at the old place


@pytest.mark.slow
def test_resuming_another_runs_checkpoint_in_a_new_dir_judges_its_best_afresh(straight, nanogpt_cache, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(straight, source)
    _claim_best_score(source / "checkpoints" / "last.ckpt", 0.5)
    before = _files(source)
    finetuned = tmp_path / "finetuned"  # the README's fine-tuning: another run's checkpoint, a new run dir
    result = train(finetuned, nanogpt_cache, "--ckpt_path", source / "checkpoints" / "last.ckpt", max_steps=85)
    assert result.returncode == 0, result.stderr[-3000:]

    # the source's score belongs to the source's best.ckpt, which is not here: this dir gets its own best
    ckpts = finetuned / "checkpoints"
    # step checkpoints every 10 steps (--checkpoint.every_n_steps), the newest 2 kept; last.ckpt at the end, step 85
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step-00000070.ckpt", "step-00000080.ckpt"]
    assert load(ckpts / "last.ckpt")["global_step"] == 85
    assert load(ckpts / "best.ckpt")["global_step"] == 75
    (val,) = read_scalars(finetuned)["val/loss"]
    assert float(_checkpoint_state(ckpts / "last.ckpt")["best_model_score"]) == pytest.approx(val[1], abs=1e-6)
    assert _files(source) == before


def test_a_signal_at_an_every_n_step_writes_last_ckpt_once(shakespeare_text, tmp_path):
    """The signal's checkpoint of step 5 is also the every-5-steps one: last.ckpt is written once, not twice."""
    import lightning as L

    from nanogpt.training.checkpointing import run_checkpoints
    from nanogpt.training.checkpointing import AtomicCheckpointIO
    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.training.fault import FaultTolerance, TrainingInterrupted
    from nanogpt.training.module import GPTModule

    class CountingIO(AtomicCheckpointIO):
        def __init__(self):
            super().__init__()
            self.saved = []  # (step, file name) of every write

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.saved.append((checkpoint["global_step"], Path(path).name))
            super().save_checkpoint(checkpoint, path, storage_options)

    class SignalAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:  # FaultTolerance's handler is installed: it only notes the signal
                os.kill(os.getpid(), signal.SIGTERM)

    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=16, batch_size=4, val_blocks=4, cache_dir=str(tmp_path / "c"))
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    io = CountingIO()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, val_check_interval=100, check_val_every_n_epoch=None, max_epochs=-1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path / "run",
        plugins=[io], callbacks=[SignalAt(), FaultTolerance(), *run_checkpoints(str(ckpt_dir), every_n_steps=5)],
    )
    with pytest.raises(TrainingInterrupted):
        trainer.fit(model, datamodule=dm)
    assert sorted(name for step, name in io.saved if step == 5) == ["last.ckpt", "step-00000005.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 5
