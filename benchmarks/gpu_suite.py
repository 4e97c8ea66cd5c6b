"""The GPU figures in one command, on one GPU, within a time budget.

    python benchmarks/gpu_suite.py --out DIR [--budget-s 540] [--corpus tinyshakespeare.txt] [--only NAME ...]
    python benchmarks/gpu_suite.py --smoke --out DIR    # the same plumbing on a CPU with the tiny config (tests)
    python benchmarks/gpu_suite.py --dry-run [--smoke]   # the plan as one JSON line: precision, peak, commands

Most important first:
  lecture_ratio  configs/shakespeare_char.yaml, compiled: ours / plain tokens/s (throughput.py; the plain loop
                 runs bf16 or fp32 only, so on a 16-mixed GPU (V100, T4) this one reports its error)
  time_to_target the same config to val/loss 1.47: seconds of training, and validation's share of wall time
                 (timed_run.py); time_to_target_muon: the same with Muon and warmup-stable-decay over 3000 steps
  gpt2_124m_mfu  configs/gpt2_124m_char.yaml: MFU against the GPU's dense peak at that precision (throughput.py)
  generate       lecture-config sampling, KV cache against none, and the compiled cached decode step (sample_speed.py)
Training runs in the precision the training CLI chooses for the GPU (nanogpt/training/precision.py: bf16-mixed
from compute capability 8.0, 16-mixed on 7.x), or --precision; every training command passes it as
--trainer.precision, and results.json records it with each benchmark (sampling runs in fp32).
Each runs as its own process (a crash or out-of-memory in one leaves the rest), with its own share of what is
left of the budget as its timeout. DIR gets <name>.log (the whole output) and results.json (each benchmark's last
JSON line, or why it has none); the last line printed is the same JSON.

On a GPU machine with a network: `pip install -e .`, then the first command above (the corpus downloads itself).
On one without a network that has torch, lightning, torchmetrics and tensorboard but not jsonargparse (the CLI's
parser) nor the corpus, first fill .whl/ (git-ignored) on a machine with a network, from the repo root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      "jsonargparse==4.53.0" "typeshed_client==2.15.0" "docstring_parser==0.18.0"
    cp path/to/tinyshakespeare.txt .whl/input.txt    # the corpus, which the suite seeds a fresh data cache with

(set --python-version to the GPU machine's Python), then carry .whl/ along and run there, in the repo root
(about 9 minutes with the default budget):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_suite.py --out DIR --corpus .whl/input.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
MUON_WSD = ["--model.optimizer", "muon", "--model.schedule", "wsd"]  # the time-to-quality options


@dataclass
class Bench:
    name: str
    script: str  # in benchmarks/
    args: list[str]
    share: float  # of the budget left when it starts (the last one gets all that is left)
    precision: str  # what it computes in: the suite's training precision, or 32-true (sampling)


def suite(smoke: bool, peak_tflops: Optional[float], precision: str = "bf16-mixed") -> list[Bench]:
    """The benchmarks and their arguments, training in precision; with smoke, tiny CPU versions of the same calls
    (no compile)."""
    p = ["--trainer.precision", precision]
    if smoke:
        tiny = ["--config", "configs/tiny.yaml", "--device", "cpu", *p]
        return [
            Bench("lecture_ratio", "throughput.py", [*tiny, "--steps", "3", "--warmup", "1", "--repeats", "1"], 0.3,
                  precision),
            Bench("time_to_target", "timed_run.py", [*tiny, "--steps", "4", "--val-every", "2", "--target-loss", "10",
                                                     "--stop-at-target"], 0.3, precision),
            Bench("time_to_target_muon", "timed_run.py", [*tiny, *MUON_WSD, "--steps", "4", "--val-every", "2",
                                                          "--target-loss", "10", "--stop-at-target"], 0.3, precision),
            Bench("gpt2_124m_mfu", "throughput.py", [*tiny, "--steps", "2", "--warmup", "1", "--repeats", "1",
                                                     "--peak-tflops", "1"], 0.5, precision),
            Bench("generate", "sample_speed.py", ["--configs", "cpu", "--batch_sizes", "1", "--new_tokens", "20",
                                              "--device", "cpu"], 1.0, "32-true"),
        ]
    lecture = ["--config", "configs/shakespeare_char.yaml", "--device", "cuda", "--model.compile", "true", *p]
    peak = ["--peak-tflops", str(peak_tflops)] if peak_tflops else []
    return [
        # compilation dominates (each side compiles its model afresh, a minute or so cold); a GPU's step times
        # hold steady, so one run of each side gives the ratio
        Bench("lecture_ratio", "throughput.py", [*lecture, "--steps", "400", "--warmup", "30", "--repeats", "1"], 0.3,
              precision),
        Bench("time_to_target", "timed_run.py", [*lecture, "--target-loss", "1.47", "--stop-at-target"], 0.35,
              precision),
        # Muon's sample efficiency lets the schedule end sooner: the cool-down ends at step 3000, not 5000
        Bench("time_to_target_muon", "timed_run.py", [*lecture, *MUON_WSD, "--trainer.max_steps", "3000",
                                                      "--target-loss", "1.47", "--stop-at-target"], 0.5, precision),
        Bench("gpt2_124m_mfu", "throughput.py", ["--config", "configs/gpt2_124m_char.yaml", "--device", "cuda", *p,
                                                 *peak, "--steps", "40", "--warmup", "10", "--repeats", "1"], 0.8,
              precision),
        Bench("generate", "sample_speed.py", ["--configs", "lecture", "--batch_sizes", "1", "--new_tokens", "500",
                                          "--device", "cuda", "--compile"], 1.0, "32-true"),
    ]


def gpu_plan(device_name: Optional[str], capability: Optional[tuple[int, int]], precision: Optional[str]) -> dict:
    """What the suite runs in on this device (a CPU: name and capability None): the precision the training CLI
    would choose (or the one given) and why, and the device's dense peak at it (None where the table has none)."""
    from nanogpt.training.peaks import gpu_peak_tflops
    from nanogpt.training.precision import choose_precision

    default = choose_precision(capability, device_name or "cpu")
    chosen = precision or default.precision
    reason = default.reason if precision in (None, default.precision) else f"--precision; default {default.precision}"
    peak = gpu_peak_tflops(device_name, chosen) if device_name else None
    return {"device": device_name or "cpu", "precision": chosen, "precision_reason": reason, "peak_tflops": peak}


def last_json(output: str) -> Optional[dict]:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run(bench: Bench, timeout: float, out: Path, env: dict[str, str]) -> dict:
    """Runs one benchmark as its own process; its whole output goes to out/<name>.log."""
    start = time.monotonic()
    cmd = [sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args]
    log = out / f"{bench.name}.log"
    with open(log, "w") as f:
        f.write(" ".join(cmd[1:]) + "\n")
        f.flush()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    result = last_json(log.read_text()) if status == "ok" else None
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "precision": bench.precision,
            "command": "python benchmarks/" + " ".join([bench.script, *bench.args]), "result": result}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="where the logs and results.json go (created; needed unless --dry-run)")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole suite")
    p.add_argument("--corpus", default=None, help="tiny-shakespeare's input.txt, to seed a fresh data cache "
                                                  "(a machine without a network cannot download it)")
    p.add_argument("--only", nargs="+", default=None, help="run only these benchmarks, in the suite's order")
    p.add_argument("--smoke", action="store_true", help="tiny CPU versions of the same calls, to test the plumbing")
    p.add_argument("--precision", default=None, choices=["bf16-mixed", "16-mixed", "32-true"],
                   help="training precision (default: the training CLI's choice for the GPU; 32-true with --smoke)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (device, precision and why, peak, commands) as one JSON line; run nothing")
    args = p.parse_args(argv)
    if args.out is None and not args.dry_run:
        p.error("--out DIR is needed: where the logs and results.json go")
    deadline = time.monotonic() + args.budget_s

    if args.smoke:
        plan = gpu_plan(None, None, args.precision)
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here; run on a GPU, or pass --smoke to check the plumbing on a CPU")
        plan = gpu_plan(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), args.precision)
    benches = suite(args.smoke, plan["peak_tflops"], plan["precision"])
    if args.only:
        unknown = set(args.only) - {b.name for b in benches}
        if unknown:
            p.error(f"--only: no benchmark named {sorted(unknown)}; the suite has {[b.name for b in benches]}")
        benches = [b for b in benches if b.name in args.only]
    print(f"{plan['device']}: precision {plan['precision']} ({plan['precision_reason']}), "
          f"peak {plan['peak_tflops']} TFLOP/s", flush=True)
    if args.dry_run:
        commands = {b.name: "python benchmarks/" + " ".join([b.script, *b.args]) for b in benches}
        print(json.dumps({**plan, "commands": commands}))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="nanogpt-cache-") as cache:
        if args.corpus:
            seeded = Path(cache) / "tinyshakespeare" / "input.txt"
            seeded.parent.mkdir(parents=True)
            shutil.copyfile(args.corpus, seeded)
            env["NANOGPT_CACHE"] = cache
        results: dict[str, dict] = {}
        for i, bench in enumerate(benches):
            left = deadline - time.monotonic()
            if left < 10:
                results[bench.name] = {"status": "skipped: the budget is spent", "result": None}
                continue
            share = 1.0 if i == len(benches) - 1 else bench.share
            results[bench.name] = run(bench, left * share, out, env)
            print(f"{bench.name}: {results[bench.name]['status']} in {results[bench.name]['seconds']} s", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))  # kept if a later one hangs the machine
    print(json.dumps(results))


if __name__ == "__main__":
    main()
