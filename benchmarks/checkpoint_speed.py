"""Checkpoint cost: how long a save blocks training, sync and async, how many bytes a save writes, load and check
times, and the wall-time overhead of a run that is interrupted (SIGTERM) and resumed over a straight run.

    python benchmarks/checkpoint_speed.py [--config configs/gpt2_124m_char.yaml] [--saves 3] [--repeats 3]
        [--resume_steps 200] [--skip_resume] [--workdir DIR]

Saves: the full training state of --config's model built on the CPU (weights, AdamW state after one step, RNG
states), saved --saves times the way a run saves at a validation: best.ckpt, step-N.ckpt (the oldest pruned past
keep_last_k 2) and last.ckpt asked for through RunCheckpointIO, then committed. blocked_s_* is the median time the
training thread spends in one save (building the three checkpoint dicts included), first with
--checkpoint.async_save false, then true; between async saves the weights are changed in place (the next steps) and
the write is let finish (a run validates every few hundred steps), its time reported as write_s_async.
blocked_s_lightning_async_clone is Lightning's AsyncCheckpointIO around AtomicCheckpointIO for comparison (one name,
a fresh clone of every tensor per save).
bytes_written_per_save is what the process wrote per save (/proc/self/io), against checkpoint_bytes, one file.
Load is read_checkpoint (weights_only=True); check is check_resumable, the validation `--ckpt_path` runs first.
Resume overhead: the tiny config run straight for --resume_steps steps, and the same run stopped by SIGTERM half
way and resumed with --ckpt_path last; run_dir_checkpoints is the straight run's checkpoint dir on disk (each inode
once, as du counts it) in checkpoints (keep_last_k 2).
Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from nanogpt.io import check_resumable, read_checkpoint, step_checkpoint_name
from nanogpt.model import GPT, GPTConfig
from nanogpt.training.checkpoint_io import AtomicCheckpointIO, RunCheckpointIO
from nanogpt.training.resume import capture_rng_state

REPO = Path(__file__).resolve().parents[1]
KEEP_LAST_K = 2  # train.py's default --checkpoint.keep_last_k


def training_state(config: Path) -> tuple[GPT, torch.optim.Optimizer, dict]:
    """The model of a config file (65 characters), and AdamW after one step (both moments filled), on the CPU."""
    settings = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    model_config = GPTConfig.from_dict({**settings, "vocab_size": 65})
    model = GPT(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    idx = torch.randint(0, 65, (1, 8))  # a short batch: only the state's size matters here
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    return model, optimizer, model_config.to_dict()


def dump(model: GPT, optimizer: torch.optim.Optimizer, hparams: dict, step: int) -> dict:
    """A checkpoint dict as Lightning's dump_checkpoint builds it for train.py (references to the live tensors)."""
    return {
        "epoch": 0,
        "global_step": step,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "rng_states": [capture_rng_state()],
        "hyper_parameters": hparams,
    }


def bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux), or 0 where /proc/self/io is not there."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def disk_bytes(directory: Path) -> int:
    """What du counts for the files in directory: each inode once (hard links share one), allocated blocks."""
    seen, total = set(), 0
    for p in directory.iterdir():
        st = p.stat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def time_saves(directory: Path, model: GPT, optimizer, hparams: dict, saves: int, async_save: bool) -> dict:
    """--saves validations' saves through RunCheckpointIO; medians of the blocked time and bytes written."""
    ckpts = directory / ("async" if async_save else "sync")
    ckpts.mkdir()
    io = RunCheckpointIO(async_save=async_save)
    blocked, written, background = [], [], []
    for i in range(saves):
        step = 500 * (i + 1)
        before = bytes_written()
        t = time.perf_counter()
        io.save_checkpoint(dump(model, optimizer, hparams, step), ckpts / "best.ckpt")
        io.save_checkpoint(dump(model, optimizer, hparams, step), ckpts / step_checkpoint_name(step))
        if i >= KEEP_LAST_K:
            io.remove_checkpoint(ckpts / step_checkpoint_name(step - 500 * KEEP_LAST_K))
        io.save_checkpoint(dump(model, optimizer, hparams, step), ckpts / "last.ckpt")
        io.commit()
        blocked.append(time.perf_counter() - t)
        with torch.no_grad():  # the steps after the save change the weights while it is written
            for p in model.parameters():
                p.mul_(0.999)
        io.wait()
        background.append(time.perf_counter() - t)
        written.append(bytes_written() - before)
    io.teardown()
    size = (ckpts / "last.ckpt").stat().st_size
    for p in ckpts.glob("*.ckpt"):  # every name an ordinary, complete checkpoint
        assert torch.load(p, weights_only=True, mmap=True)["global_step"] > 0, p
    kind = "async" if async_save else "sync"
    result = {
        f"blocked_s_{kind}": round(statistics.median(blocked), 3),
        f"bytes_written_per_save_{kind}": int(statistics.median(written)),
        f"checkpoints_on_disk_{kind}": round(disk_bytes(ckpts) / size, 2),
        "checkpoint_bytes": size,
    }
    if async_save:
        result["write_s_async"] = round(statistics.median(background), 3)
    return result


def time_lightning_clone(directory: Path, model: GPT, optimizer, hparams: dict, saves: int) -> float:
    """The blocked time of Lightning's AsyncCheckpointIO (a fresh clone of every tensor, then a thread), one name."""
    io = AsyncCheckpointIO(AtomicCheckpointIO())
    blocked = []
    for i in range(saves):
        checkpoint = dump(model, optimizer, hparams, 500 * (i + 1))
        t = time.perf_counter()
        io.save_checkpoint(checkpoint, directory / "lightning.ckpt")
        blocked.append(time.perf_counter() - t)
        io.teardown()  # let the write finish, as between the validations of a run
    (directory / "lightning.ckpt").unlink()
    return round(statistics.median(blocked), 3)


def time_load(path: Path, repeats: int) -> dict:
    load, check = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        read_checkpoint(path)
        load.append(time.perf_counter() - t)
        t = time.perf_counter()
        check_resumable(path)
        check.append(time.perf_counter() - t)
    return {"load_s": round(min(load), 3), "check_s": round(min(check), 3)}


def time_save_load(directory: Path, config: Path, saves: int, repeats: int) -> dict:
    model, optimizer, hparams = training_state(config)
    result = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
              "parameters": sum(p.numel() for p in model.parameters())}
    for async_save in (False, True):
        result.update(time_saves(directory, model, optimizer, hparams, saves, async_save))
    result["bytes_written_per_save"] = result["bytes_written_per_save_async"]
    result["async_blocked_ratio"] = round(result["blocked_s_async"] / result["blocked_s_sync"], 3)
    result["blocked_s_lightning_async_clone"] = time_lightning_clone(directory, model, optimizer, hparams, saves)
    result.update(time_load(directory / "async" / "last.ckpt", repeats))
    shutil.rmtree(directory / "sync")
    shutil.rmtree(directory / "async")
    return result


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
    ckpts = directory / "straight" / "checkpoints"
    return {
        "resume_steps": steps,
        "run_dir_checkpoints": round(disk_bytes(ckpts) / (ckpts / "last.ckpt").stat().st_size, 2),
        "straight_s": round(straight, 2),
        "interrupted_plus_resumed_s": round(first + second, 2),
        "resume_overhead_ratio": round((first + second) / straight, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char.yaml"),
                   help="whose model's training state is saved (default: the lecture model)")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="loads and checks, the best taken")
    p.add_argument("--resume_steps", type=int, default=200)
    p.add_argument("--skip_resume", action="store_true")
    p.add_argument("--workdir", default=str(REPO / "benchmarks"),
                   help="where the checkpoints and runs are written (a temporary folder inside it, deleted after)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    directory = Path(tempfile.mkdtemp(dir=args.workdir, prefix=".ckpt_bench_"))  # the disk runs write to
    try:
        result = {"torch": torch.__version__, **time_save_load(directory, Path(args.config).resolve(), args.saves,
                                                                args.repeats)}
        if not args.skip_resume:
            result.update(time_resume(directory, args.resume_steps))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
