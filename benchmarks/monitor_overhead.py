"""What monitoring costs: training steps/s with and without TrainingMonitor, interleaved in one process.

    python benchmarks/monitor_overhead.py [--source PATH] [--steps 300] [--repeats 3] [--accelerator cpu|gpu]

Both variants log train/loss and train/lr to TensorBoard every 10 steps (the default); the monitored one adds
grad norm, tokens/s, tokens seen and MFU. Model: configs/shakespeare_char_cpu.yaml's (4 layers, 128 wide,
context 64, batch 12). Prints one JSON line: the median steps/s of each variant and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import lightning as L

from nanogpt.data import CharDataModule
from nanogpt.module import GPTModule
from nanogpt.monitor import RunTensorBoardLogger, TrainingMonitor


class StepTimer(L.Callback):
    """Wall time of the steps after the first `skip` (which pay for warm-up)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.end, self.steps = skip, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end, self.steps = time.perf_counter(), trainer.global_step - self.skip


def steps_per_sec(monitor: bool, args: argparse.Namespace) -> float:
    dm = CharDataModule(source=args.source, batch_size=12, block_size=64)
    model = GPTModule(vocab_size=dm.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    timer = StepTimer(skip=20)
    with tempfile.TemporaryDirectory() as run:
        trainer = L.Trainer(
            accelerator=args.accelerator, devices=1, max_steps=args.steps, max_epochs=-1, limit_val_batches=0,
            log_every_n_steps=10, gradient_clip_val=1.0, logger=RunTensorBoardLogger(run),
            callbacks=[timer, TrainingMonitor(sample_tokens=0)] if monitor else [timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model, datamodule=dm)
    return timer.steps / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="tinyshakespeare")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    plain, monitored = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        plain.append(steps_per_sec(False, args))
        monitored.append(steps_per_sec(True, args))
    result = {
        "benchmark": "monitor_overhead",
        "accelerator": args.accelerator,
        "steps": args.steps,
        "repeats": args.repeats,
        "plain_steps_per_sec": round(statistics.median(plain), 2),
        "monitored_steps_per_sec": round(statistics.median(monitored), 2),
        "monitored_over_plain": round(statistics.median(monitored) / statistics.median(plain), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
