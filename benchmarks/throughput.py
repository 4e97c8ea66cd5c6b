"""Training throughput: our Lightning path against a minimal hand-written loop, on the same GPT and batches.

    python benchmarks/throughput.py --config configs/shakespeare_char_cpu.yaml --steps 200 --repeats 5
    python benchmarks/throughput.py --config configs/shakespeare_char.yaml --device cuda --model.compile true

Ours is what train.py runs: GPTLightningCLI builds the LightningModule, DataModule and Trainer with the run's
TensorBoard logger, checkpoint callback and progress bar, and trainer.fit trains. Plain is benchmarks/plain_loop.py.
Both train the same network from the same initial weights on the same batches with the same optimizer, schedule,
clipping and precision: --warmup untimed steps (first-step and compile costs), then --steps timed ones. Runs
alternate in pairs whose order flips each repeat (ours-plain, plain-ours, ...), so drift on a shared machine and
any edge of going first or second hit both sides alike; the medians are compared. With --interleave the sides take
turns every log_every_n_steps steps inside one of our runs instead (the plain loop runs in a callback, its time
kept out of ours), so each pair of windows is a second apart; the median windows are compared.
Any other argument (--model.*, --data.*, --trainer.*) goes to the training config of both sides.
Prints a table, then one JSON line: {"ours_tokens_per_s", "plain_tokens_per_s", "ratio" (ours / plain), ...}.
"windowed_ratio" is the same from each run's median window of log_every_n_steps steps instead of its whole time:
every window holds one logging step, and a neighbour's burst on a shared machine moves the median little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from nanogpt.training.cli import GPTLightningCLI
from nanogpt.data.blocks import tokens_to_device
from nanogpt.errors import NanoGPTError
from plain_loop import PlainLoop, PlainSettings, train_plain
from timed_run import RunTimer, quiet_lightning, step_windows, sync_device


@dataclass
class Run:
    side: str  # "ours" or "plain"
    steps: int
    seconds: float
    cpu_seconds: float  # process CPU time: with --threads 1 it hardly moves when other jobs share the machine
    tokens_per_s: float
    final_loss: float
    # tokens/s over the median window of log_every_n_steps steps (timed_run.step_windows); None: a run of fewer steps
    window_tokens_per_s: Optional[float] = None


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="a training config, e.g. configs/shakespeare_char_cpu.yaml")
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them (compilation, caches)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides (torch.set_num_threads); 1 steadies figures on a busy machine")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (H100 SXM 989): adds MFU to the results")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the two sides every log_every_n_steps steps inside one of our runs, not run by\n"
                        "run: each pair of windows is a second apart, so a shared machine's drift cancels")
    args, config_args = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be positive and --warmup not negative")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args, config_args


def build_cli(args: argparse.Namespace, config_args: list[str], run_dir: str) -> GPTLightningCLI:
    """The training CLI exactly as train.py builds it, into a fresh run dir, for warmup + steps steps."""
    return GPTLightningCLI([
        "--config", args.config, *config_args,
        "--trainer.accelerator", args.device,
        "--trainer.devices", "1",
        "--trainer.default_root_dir", run_dir,
        "--trainer.max_steps", str(args.warmup + args.steps),
    ])


def tokens_per_step(cli: GPTLightningCLI) -> int:
    """Tokens in one optimizer step, after fit: data.batch_size is already the global batch, so from the batch plan
    (as the monitor counts it), not batch_size x accumulation."""
    return cli.datamodule.batch_plan.global_batch * cli.model.config.block_size


def run_ours(args: argparse.Namespace, config_args: list[str]) -> Run:
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as run_dir:
        cli = build_cli(args, config_args, run_dir)
        timer = RunTimer(warmup=args.warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds, tokens = timer.train_seconds, tokens_per_step(cli)
        return Run("ours", timer.timed_steps, seconds, timer.train_cpu_seconds, timer.timed_steps * tokens / seconds,
                   timer.final_loss, window_tokens_per_s(timer.step_ends, cli.trainer.log_every_n_steps, tokens))


def window_tokens_per_s(step_ends: list[float], every: int, tokens: int) -> Optional[float]:
    windows = step_windows(step_ends, every)
    return every * tokens / statistics.median(windows) if windows else None


def plain_setup(args: argparse.Namespace, config_args: list[str]) -> tuple[PlainSettings, Any, torch.device, int]:
    """The plain loop's settings, tokens and device, from the training config resolved as for ours, and the
    config's log_every_n_steps (the window of the windowed figure, as ours')."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as run_dir:
        return plain_setup_from(build_cli(args, config_args, run_dir))  # the CLI only resolves the config


def plain_setup_from(cli: GPTLightningCLI) -> tuple[PlainSettings, Any, torch.device, int]:
    """plain_setup from a training CLI already built (--interleave: the one of our run)."""
    hp, trainer, dm = cli.model.hparams, cli.trainer, cli.datamodule
    if trainer.precision not in ("32-true", "bf16-mixed"):
        raise NanoGPTError(f"the plain loop runs 32-true or bf16-mixed, not {trainer.precision}; pass --trainer.precision")
    if trainer.accumulate_grad_batches != 1:
        raise NanoGPTError("the plain loop does not accumulate gradients; pass --trainer.accumulate_grad_batches 1")
    settings = PlainSettings(
        config=cli.model.config,
        batch_size=dm.batch_size,
        seed=cli.config["seed_everything"],
        data_seed=dm.seed,
        optim=cli.model.optim_settings,
        max_steps=trainer.max_steps,
        grad_clip=trainer.gradient_clip_val or 0.0,
        bf16=trainer.precision == "bf16-mixed",
        compile=hp.compile,
    )
    device = trainer.strategy.root_device
    # like ours: a corpus that fits lives on the GPU and batches are gathered there
    tokens = tokens_to_device(dm.train_tokens, device) if device.type == "cuda" else dm.train_tokens
    return settings, tokens, device, trainer.log_every_n_steps


def run_plain(args: argparse.Namespace, config_args: list[str]) -> Run:
    settings, tokens, device, every = plain_setup(args, config_args)
    r = train_plain(settings, tokens, device, steps=args.steps, warmup=args.warmup)
    step_tokens = settings.batch_size * settings.config.block_size
    return Run("plain", r.steps, r.seconds, r.cpu_seconds, r.tokens_per_s, r.final_loss,
               window_tokens_per_s(r.step_ends, every, step_tokens))


class Interleave(L.Callback):
    """Runs the plain loop inside our run: after every `every` of our steps, `every` of its steps (--interleave).

    Our window runs from the end of the plain one to our callback `every` steps later, so it holds one of each of
    our per-step hooks, and with every = log_every_n_steps exactly one logging step; the plain window is its
    `every` steps. A window pair with a validation in it is left out. Syncs the device at window edges only.
    """

    def __init__(self, plain: PlainLoop, warmup: int, every: int) -> None:
        self.plain, self.warmup, self.every = plain, warmup, every
        self.windows: list[tuple[float, float]] = []  # (ours, plain) seconds of each kept pair
        self.cpu: list[tuple[float, float]] = []  # the same in process CPU time
        self.plain_loss: Optional[torch.Tensor] = None
        self._mark: Optional[tuple[float, float]] = None  # wall and CPU clocks where our window began
        self._validated = False

    def _plain(self, steps: int) -> None:
        for _ in range(steps):
            self.plain_loss = self.plain.step().detach()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step < self.warmup or (step - self.warmup) % self.every:
            return
        sync_device(pl_module)
        ours_end = (time.perf_counter(), time.process_time())
        if self._mark is None:  # the end of our warm-up: the plain loop warms up too, untimed
            self._plain(self.warmup)
        else:
            self._plain(self.every)
            sync_device(pl_module)
            plain_end = (time.perf_counter(), time.process_time())
            if not self._validated:
                self.windows.append((ours_end[0] - self._mark[0], plain_end[0] - ours_end[0]))
                self.cpu.append((ours_end[1] - self._mark[1], plain_end[1] - ours_end[1]))
        self._validated = False
        self._mark = (time.perf_counter(), time.process_time())


def run_interleaved(args: argparse.Namespace, config_args: list[str]) -> tuple[Interleave, float, int]:
    """One of our runs with the plain loop interleaved; its windows, our final loss, and tokens per step."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as run_dir:
        cli = build_cli(args, config_args, run_dir)
        settings, tokens, device, every = plain_setup_from(cli)
        interleave, timer = Interleave(PlainLoop(settings, tokens, device), args.warmup, every), RunTimer()
        cli.trainer.callbacks.extend([interleave, timer])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return interleave, timer.final_loss, tokens_per_step(cli) * every


def report_interleaved(args: argparse.Namespace, config_args: list[str]) -> dict[str, Any]:
    """--interleave: every repeat is one of our runs with the plain loop's windows between ours."""
    windows: list[tuple[float, float]] = []
    cpu: list[tuple[float, float]] = []
    for i in range(args.repeats):
        run, ours_loss, window_tokens = run_interleaved(args, config_args)
        if not run.windows:
            raise NanoGPTError(f"--interleave needs --steps of at least log_every_n_steps ({run.every}) and no "
                               "validation in every window; pass more --steps")
        windows += run.windows
        cpu += run.cpu
        o, p = (statistics.median(w[k] for w in run.windows) for k in (0, 1))
        print(f"run {i + 1}/{args.repeats}: {len(run.windows)} window pairs, median ours {1e3 * o:.1f} ms, plain "
              f"{1e3 * p:.1f} ms, ratio {p / o:.4f}; final loss ours {ours_loss:.4f}, plain {float(run.plain_loss):.4f}",
              flush=True)
    ours_s, plain_s = (statistics.median(w[k] for w in windows) for k in (0, 1))
    pairs = [p / o for o, p in windows]  # ours / plain tokens/s of each adjacent pair
    return {
        "ours_tokens_per_s": round(window_tokens / ours_s, 1),
        "plain_tokens_per_s": round(window_tokens / plain_s, 1),
        "ratio": round(plain_s / ours_s, 4),
        "paired_ratio_median": round(statistics.median(pairs), 4),
        "window_pairs": len(windows),
        "ours_cpu_ms_per_window": round(1e3 * statistics.median(c[0] for c in cpu), 3),
        "plain_cpu_ms_per_window": round(1e3 * statistics.median(c[1] for c in cpu), 3),
        "ours_final_loss": ours_loss,
        "plain_final_loss": float(run.plain_loss),
    }


def flops_per_token(cli: GPTLightningCLI) -> float:
    """Training FLOPs per token (PaLM appendix B, as in nanoGPT): 6 per weight plus attention's 12 * L * T * C."""
    c = cli.model.config
    return 6 * cli.model.model.num_params(non_embedding=True) + 12 * c.n_layer * c.block_size * c.n_embd


def cpu_ms_per_step(runs: list[Run], side: str) -> float:
    return round(1e3 * statistics.median(r.cpu_seconds / r.steps for r in runs if r.side == side), 3)


def report_runs(args: argparse.Namespace, config_args: list[str]) -> dict[str, Any]:
    """Whole runs of each side, alternating, their order flipping each repeat (the default)."""
    runs: list[Run] = []
    for i in range(args.repeats):
        for side in ((run_ours, run_plain) if i % 2 == 0 else (run_plain, run_ours)):
            runs.append(side(args, config_args))
            r = runs[-1]
            print(f"run {i + 1}/{args.repeats} {r.side:>5}: {r.steps} steps in {r.seconds:.3f} s, "
                  f"{r.tokens_per_s:,.0f} tokens/s, CPU {r.cpu_seconds:.3f} s, final loss {r.final_loss:.4f}", flush=True)

    ours = [r.tokens_per_s for r in runs if r.side == "ours"]
    plain = [r.tokens_per_s for r in runs if r.side == "plain"]
    ours_med, plain_med = statistics.median(ours), statistics.median(plain)
    # each repeat's two runs, taken back to back: on a shared machine neighbours share their conditions, so the
    # median of these is a steadier estimate than the ratio of the two medians (which the target names)
    pairs = [o / p for o, p in zip(ours, plain)]
    result = {
        "ours_tokens_per_s": round(ours_med, 1),
        "plain_tokens_per_s": round(plain_med, 1),
        "ratio": round(ours_med / plain_med, 4),
        # median CPU time per timed step: on a shared CPU with --threads 1, plain/ours of these is the steadier
        # estimate of the ratio (wall time also counts what other jobs take from us)
        "ours_cpu_ms_per_step": cpu_ms_per_step(runs, "ours"),
        "plain_cpu_ms_per_step": cpu_ms_per_step(runs, "plain"),
        "paired_ratio_median": round(statistics.median(pairs), 4),
        "paired_ratios": [round(x, 4) for x in pairs],
        "ours_runs": [round(x, 1) for x in ours],
        "plain_runs": [round(x, 1) for x in plain],
        # same weights, batches and optimizer: the two final losses agree (to float rounding on a GPU)
        "ours_final_loss": [r.final_loss for r in runs if r.side == "ours"][-1],
        "plain_final_loss": [r.final_loss for r in runs if r.side == "plain"][-1],
    }
    result["cpu_time_ratio"] = round(result["plain_cpu_ms_per_step"] / result["ours_cpu_ms_per_step"], 4)
    # the same from each run's median window of log_every_n_steps steps: a neighbour's burst on a shared machine
    # lands in a few windows and leaves the median alone, while each window still holds one logging step
    ours_w = [r.window_tokens_per_s for r in runs if r.side == "ours"]
    plain_w = [r.window_tokens_per_s for r in runs if r.side == "plain"]
    if None not in ours_w and None not in plain_w:
        result["windowed_ratio"] = round(statistics.median(ours_w) / statistics.median(plain_w), 4)
        result["windowed_paired_ratio_median"] = round(statistics.median(o / p for o, p in zip(ours_w, plain_w)), 4)
        result["ours_window_runs"] = [round(x, 1) for x in ours_w]
        result["plain_window_runs"] = [round(x, 1) for x in plain_w]

    print()
    print(f"{'':>6} {'median tokens/s':>16} {'runs':>40}")
    for side, values, med in (("ours", ours, ours_med), ("plain", plain, plain_med)):
        print(f"{side:>6} {med:>16,.0f} {', '.join(f'{v:,.0f}' for v in values):>40}")
    if "windowed_ratio" in result:
        print(f"windowed ratio:   {result['windowed_ratio']:.4f}  (median of paired runs "
              f"{result['windowed_paired_ratio_median']:.4f}; each run's median window of log_every_n_steps steps)")
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args, config_args = parse_args(argv)
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = report_interleaved(args, config_args) if args.interleave else report_runs(args, config_args)
    except NanoGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result.update(
        mode="interleaved" if args.interleave else "runs",
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        config=args.config, config_args=config_args, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
        threads=torch.get_num_threads(),
    )
    if args.peak_tflops:
        with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as run_dir:
            fpt = flops_per_token(build_cli(args, config_args, run_dir))
        result["ours_mfu"] = round(result["ours_tokens_per_s"] * fpt / (args.peak_tflops * 1e12), 4)
        result["plain_mfu"] = round(result["plain_tokens_per_s"] * fpt / (args.peak_tflops * 1e12), 4)
    print(f"ratio ours/plain: {result['ratio']:.4f}  (median of paired {'windows' if args.interleave else 'runs'} "
          f"{result['paired_ratio_median']:.4f}; {Path(args.config).name}, {result['device']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
