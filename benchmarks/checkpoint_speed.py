"""Checkpoint cost: time to save and load a checkpoint of the lecture model, and the wall-time overhead of a run
that is interrupted (SIGTERM) and resumed over a straight run.

    python benchmarks/checkpoint_speed.py [--repeats 5] [--resume_steps 200] [--skip_resume] [--workdir DIR]

Save/load: a full training checkpoint of configs/shakespeare_char.yaml's model (weights, AdamW state, RNG
states), written with AtomicCheckpointIO (temp file, fsync, rename) and with plain torch.save for comparison,
and read with read_checkpoint (weights_only=True); "check" is check_resumable, the validation `--ckpt_path` runs
before Lightning loads the file (memory-mapped: it reads the weights, not the optimizer state). Resume overhead: the tiny config run straight for
--resume_steps steps, and the same run stopped by SIGTERM half way and resumed with --ckpt_path last.
Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanogpt.io import check_resumable, read_checkpoint, step_checkpoint_name
from nanogpt.training.checkpointing import AtomicCheckpointIO
from nanogpt.training.resume import capture_rng_state
from nanogpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def lecture_checkpoint() -> dict:
    """A checkpoint dict shaped like one train.py writes for the lecture model, with AdamW state filled in."""
    model = GPT(GPTConfig())  # the defaults are the lecture's model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 65, (2, 32))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()  # creates exp_avg / exp_avg_sq for every parameter
    return {
        "global_step": 1,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
        "loops": {},  # (a training checkpoint has the loop state; check_resumable looks for it)
        "rng_states": [capture_rng_state()],
        "hyper_parameters": GPTConfig().to_dict(),
    }


def time_save_load(directory: Path, repeats: int) -> dict:
    ckpt = lecture_checkpoint()
    io = AtomicCheckpointIO()
    path = directory / "last.ckpt"
    atomic, plain, load, check = [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        io.save_checkpoint(ckpt, path)
        atomic.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.save(ckpt, directory / "plain.ckpt")
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        read_checkpoint(path)
        load.append(time.perf_counter() - t)
        t = time.perf_counter()
        check_resumable(path)
        check.append(time.perf_counter() - t)
    return {
        "checkpoint_mb": round(path.stat().st_size / 2**20, 1),
        "save_atomic_s": round(min(atomic), 3),
        "save_plain_torch_s": round(min(plain), 3),
        "load_s": round(min(load), 3),
        "check_s": round(min(check), 3),
    }


def train(run: Path, steps: int, resume: bool = False, stop_at: int | None = None) -> float:
    # a checkpoint every steps // 2 steps: the interrupted run's SIGTERM waits for the one at its half-way step
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run),
           "--checkpoint.every_n_steps", str(max(1, steps // 2))]
    if resume:
        cmd += ["--ckpt_path", "last"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop_at is not None:
        marker = run / "checkpoints" / step_checkpoint_name(stop_at)
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    expected = 143 if stop_at is not None else 0
    if proc.returncode != expected:
        raise SystemExit(f"train.py exited {proc.returncode}, expected {expected}: {err[-2000:]}")
    return time.perf_counter() - t


def time_resume(directory: Path, steps: int) -> dict:
    straight = train(directory / "straight", steps)
    first = train(directory / "resumed", steps, stop_at=steps // 2)
    second = train(directory / "resumed", steps, resume=True)
    return {
        "resume_steps": steps,
        "straight_s": round(straight, 2),
        "interrupted_plus_resumed_s": round(first + second, 2),
        "resume_overhead_ratio": round((first + second) / straight, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resume_steps", type=int, default=200)
    p.add_argument("--skip_resume", action="store_true")
    p.add_argument("--workdir", default=str(REPO / "benchmarks"),
                   help="where the checkpoints and runs are written (a temporary folder inside it, deleted after)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    directory = Path(tempfile.mkdtemp(dir=args.workdir, prefix=".ckpt_bench_"))  # the disk runs write to
    try:
        result = {"torch": torch.__version__, **time_save_load(directory, args.repeats)}
        if not args.skip_resume:
            result.update(time_resume(directory, args.resume_steps))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
