"""Tokens/s of one device with the default strategy vs `--trainer.strategy ddp --trainer.devices 1`.

    python benchmarks/ddp_overhead.py [--config configs/shakespeare_char.yaml] [--steps 200] [--warmup 20]
                                      [--repeats 2] [-- extra train.py flags]

Each measurement is a real train.py run (validation and checkpoints off) in a fresh process; the two
strategies alternate so that machine noise hits both. The last line printed is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Times optimizer steps after `warmup` and writes tokens/s to `out` (rank 0)."""

    def __init__(self, out: str, warmup: int = 20) -> None:
        self.out, self.warmup = out, warmup
        self.start: float | None = None
        self.start_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            if pl_module.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        if trainer.is_global_zero and self.start is not None:
            plan = trainer.datamodule.batch_plan
            steps = trainer.global_step - self.start_step
            seconds = time.perf_counter() - self.start
            tokens = steps * plan.global_batch * trainer.datamodule.block_size
            Path(self.out).write_text(json.dumps({"tokens_per_s": tokens / seconds, "steps": steps,
                                                  "seconds": seconds, "world_size": plan.world_size}))


def measure(config: str, strategy: list[str], steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        timer = json.dumps({"class_path": "benchmarks.ddp_overhead.StepTimer",
                            "init_args": {"out": str(out), "warmup": warmup}})
        cmd = [sys.executable, str(REPO / "train.py"), "--config", config, *strategy,
               "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
               "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(Path(tmp) / "run"), "--trainer.callbacks+", timer, *extra]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    variants = {"default": [], "ddp_devices_1": ["--trainer.strategy", "ddp", "--trainer.devices", "1"]}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, flags in variants.items():
            runs[name].append(measure(args.config, flags, args.steps, args.warmup, args.extra)["tokens_per_s"])
            print(f"{name}: {runs[name][-1]:.0f} tokens/s", file=sys.stderr)
    median = {name: statistics.median(v) for name, v in runs.items()}
    print(json.dumps({
        "config": Path(args.config).name, "steps": args.steps, "warmup": args.warmup, "runs": runs,
        "tokens_per_s": median, "ddp_over_default": median["ddp_devices_1"] / median["default"],
    }))


if __name__ == "__main__":
    main()
