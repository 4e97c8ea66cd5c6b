"""Lightning's own floor: our training path against the leanest Lightning run of the same training, and the plain loop.

    python benchmarks/lightning_floor.py --config configs/shakespeare_char_cpu.yaml [--steps 300] [--repeats 5]
    # the loop's cost alone: a near-empty model, whose step is almost all framework
    python benchmarks/lightning_floor.py --config configs/shakespeare_char_cpu.yaml --threads 1 --steps 500 \\
        --model.n_layer 1 --model.n_head 1 --model.n_embd 16 --model.block_size 16 --data.batch_size 2

Three sides train the same GPT from the same weights on the same batches with the same optimizer, schedule,
clipping and precision:
  ours   what train.py runs (as in throughput.py): the CLI's Trainer with its logger, checkpoints, monitor,
         non-finite guard and progress bar
  bare   stock Lightning at its leanest: a LightningModule with only training_step and configure_optimizers, on
         a Trainer with logger, checkpointing, progress bar and model summary off (Lightning clips the gradients)
  plain  benchmarks/plain_loop.py
ours - bare is what nanogpt adds to Lightning; bare - plain is what Lightning's loop costs by itself, which no
LightningModule can take away. Rounds rotate the order of the sides; per side, the median over rounds of the
process CPU time per timed step (steadier than wall time on a shared machine; wall time is printed too), no
validation in the window. Prints a table, then one JSON line: {"ours_ms", "bare_ms", "plain_ms",
"ours_minus_bare_ms", "bare_minus_plain_ms", ...} in CPU ms per step, and each side's final loss.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from typing import Any, Optional

import lightning as L
import torch

import throughput
from nanogpt.model import GPT
from plain_loop import PlainSettings, optimizer_and_schedule, train_plain
from timing import RunTimer, quiet_lightning, step_bench_parser

SIDES = ("ours", "bare", "plain")
NO_VALIDATION = ["--trainer.val_check_interval", str(10**9)]


class BareModule(L.LightningModule):
    """The least a LightningModule needs to train the GPT as GPTModule does."""

    def __init__(self, settings: PlainSettings) -> None:
        super().__init__()
        self.settings = settings
        torch.manual_seed(settings.seed)  # the initial weights of the other two sides
        self.model = GPT(settings.config)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.model(x, y)[1]

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule(params, self.settings, self.device)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        if self.settings.compile:
            self.model.compile(dynamic=False)


def run_side(side: str, args: Any, config_args: list[str]) -> dict[str, float]:
    """One run of a side: CPU and wall ms per timed step, and the loss of its last step."""
    if side == "plain":
        settings, tokens, device, _ = throughput.plain_setup(args, config_args)
        r = train_plain(settings, tokens, device, steps=args.steps, warmup=args.warmup)
        return {"cpu_ms": 1e3 * r.cpu_seconds / r.steps, "wall_ms": 1e3 * r.seconds / r.steps, "loss": r.final_loss}
    timer = RunTimer(warmup=args.warmup)
    with tempfile.TemporaryDirectory(prefix="nanogpt-floor-") as run_dir:
        cli = throughput.build_cli(args, [*config_args, *NO_VALIDATION], run_dir)
        if side == "ours":
            cli.trainer.callbacks.append(timer)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        else:  # the same resolved config: batches from the same DataModule, the plain loop's settings for the rest
            settings, _, _, _ = throughput.plain_setup_from(cli)
            trainer = L.Trainer(
                accelerator=args.device, devices=1, precision=cli.trainer.precision, max_steps=args.warmup + args.steps,
                gradient_clip_val=settings.grad_clip or None, callbacks=[timer], logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run_dir,
            )
            trainer.fit(BareModule(settings), datamodule=cli.datamodule)
    return {"cpu_ms": 1e3 * timer.train_cpu_seconds / timer.timed_steps,
            "wall_ms": 1e3 * timer.train_seconds / timer.timed_steps, "loss": timer.final_loss}


def main(argv: Optional[list[str]] = None) -> None:
    p = step_bench_parser(__doc__, 300, "timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=5, help="rounds of one run of each side, in rotating order")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads) for all sides")
    args, config_args = p.parse_known_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be positive and --warmup not negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()

    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for i in range(args.repeats):
        for side in SIDES[i % 3:] + SIDES[: i % 3]:  # each side goes first, second and third in turn
            runs[side].append(run_side(side, args, config_args))
            r = runs[side][-1]
            print(f"round {i + 1}/{args.repeats} {side:>5}: {r['cpu_ms']:.3f} CPU ms/step, {r['wall_ms']:.3f} wall "
                  f"ms/step, final loss {r['loss']:.4f}", flush=True)
    cpu = {side: round(statistics.median(r["cpu_ms"] for r in runs[side]), 3) for side in SIDES}
    wall = {side: round(statistics.median(r["wall_ms"] for r in runs[side]), 3) for side in SIDES}
    print(f"\n{'side':>6} {'CPU ms/step':>12} {'wall ms/step':>13}")
    for side in SIDES:
        print(f"{side:>6} {cpu[side]:12.3f} {wall[side]:13.3f}")
    print(f"nanogpt over stock Lightning: {cpu['ours'] - cpu['bare']:+.3f} ms; "
          f"Lightning's loop over the plain loop: {cpu['bare'] - cpu['plain']:+.3f} ms (CPU time a step)")
    print(json.dumps({
        "ours_ms": cpu["ours"], "bare_ms": cpu["bare"], "plain_ms": cpu["plain"],
        "ours_minus_bare_ms": round(cpu["ours"] - cpu["bare"], 3),
        "bare_minus_plain_ms": round(cpu["bare"] - cpu["plain"], 3),
        "wall_ms": wall, "cpu_ms_runs": {side: [round(r["cpu_ms"], 3) for r in runs[side]] for side in SIDES},
        "final_loss": {side: runs[side][-1]["loss"] for side in SIDES},
        "config": args.config, "config_args": config_args, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "device": args.device, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
