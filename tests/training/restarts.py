"""What the tests of scheduler restarts share: the run they train, callbacks they load into train.py, and checks.

The callbacks reach train.py through `--trainer.callbacks+ JSON` (the command line of the job under test, not a
copy of it): Throttle slows the first start down so that a test can interrupt it mid-run, LockProbe records every
start's run.lock.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

from tests.conftest import TINY_CONFIG, read_scalars

MAX_STEPS = 40
# dropout on (so the RNG states matter), a checkpoint every 10 steps, every step logged, a schedule that does not
# depend on where a start ends
ARGS = [
    "--config", str(TINY_CONFIG),
    "--trainer.max_steps", str(MAX_STEPS),
    "--trainer.val_check_interval", "20",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_steps", "10",
    "--model.dropout", "0.1",
    "--model.decay_steps", str(MAX_STEPS),
]
OFFLINE = {"NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"}


def restart_count() -> int:
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class Throttle(L.Callback):
    """Sleeps after every step of a run's first start (the one from step 0), so that it is still running when the
    test interrupts it; a resumed start runs at full speed. The weights do not depend on it."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.first_start = seconds, False

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_start = trainer.global_step == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_start:
            time.sleep(self.seconds)


class Hold(L.Callback):
    """Holds the run before training starts (in setup, before the stop handlers are installed): touches `flag`, then
    waits up to a few minutes, so that a test can signal a run that is not training yet."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def setup(self, trainer, pl_module, stage) -> None:
        Path(self.flag).touch()
        time.sleep(300)


class LockProbe(L.Callback):
    """Appends, at every start, one JSON line to `out` on global rank 0: the restart count, the run.lock this start
    holds, the step it starts from and its PID."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        lock = Path(trainer.default_root_dir, "run.lock")
        record = {"restart": restart_count(), "lock": json.loads(lock.read_text()) if lock.exists() else None,
                  "step": trainer.global_step, "pid": os.getpid()}
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")


def callbacks(probe: Path, throttle: float) -> list[str]:
    """train.py flags adding Throttle and LockProbe."""
    flags = []
    for spec in ({"class_path": "tests.training.restarts.Throttle", "init_args": {"seconds": throttle}},
                 {"class_path": "tests.training.restarts.LockProbe", "init_args": {"out": str(probe)}}):
        flags += ["--trainer.callbacks+", json.dumps(spec)]
    return flags


def starts(probe: Path) -> list[dict]:
    return [json.loads(line) for line in probe.read_text().splitlines()]


def wait_for(path: Path, proc_alive, timeout: float = 300) -> None:
    """Waits until path exists, failing early once proc_alive() says the run is over."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc_alive(), f"the run ended before {path.name} was written"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.2)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_one_run_same_weights(reference: Path, run: Path, crashed: bool = False) -> None:
    """run ended where the uninterrupted reference did, with bit-identical weights, and its TensorBoard curve is one
    run: every step once, in order, with the reference's values, in event files straight in the run dir.

    crashed: a process of the run was killed, so the scalars its TensorBoard writer held unflushed are lost (the
    weights are not): steps may be missing, never repeated.
    """
    a, b = load(reference / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert b["global_step"] == a["global_step"] == MAX_STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    losses, expected = read_scalars(run)["train/loss"], dict(read_scalars(reference)["train/loss"])
    steps = [s for s, _ in losses]
    if crashed:
        assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS - 1, steps
    else:
        assert steps == list(range(MAX_STEPS)), steps
    assert losses == [(s, expected[s]) for s in steps]
    assert not [p for p in run.rglob("events.out.tfevents.*") if p.parent != run]  # no version_N, no second run
    assert not list(run.rglob("hpc_ckpt_*.ckpt"))  # Lightning's SLURM checkpoints: never written
    assert not (run / "run.lock").exists()  # released at the end
