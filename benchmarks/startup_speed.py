"""How long `python sample.py --help` takes against `python -c "import torch"`: the cost of the sampling path's
imports beyond torch itself (no Lightning among them).

    python benchmarks/startup_speed.py [--rounds 7]

Each round runs both commands once, in turns (which goes first alternates), each in a fresh interpreter; the
figure is the ratio of the two medians of wall time (target: at most 1.6), and of CPU time beside it. One line per
round, then one JSON object: {"sample_help_s", "import_torch_s", "ratio", "cpu_ratio", "rounds", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import_torch": [sys.executable, "-c", "import torch"],
    "sample_help": [sys.executable, str(ROOT / "sample.py"), "--help"],
}


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of command from start to exit, its output discarded; a failure is an
    error. On a shared machine the CPU time moves less with the load than the wall time does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in COMMANDS}
    timed(COMMANDS["sample_help"])  # a warm-up: the page cache holds the files of both afterwards
    for r in range(args.rounds):
        order = list(COMMANDS) if r % 2 == 0 else list(reversed(COMMANDS))
        for name in order:
            wall, cpu = timed(COMMANDS[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
        print(f"round {r + 1}: " + ", ".join(f"{name} {walls[name][-1]:.2f} s ({cpus[name][-1]:.2f} CPU s)"
                                             for name in COMMANDS), flush=True)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    result = {"sample_help_s": round(wall["sample_help"], 3), "import_torch_s": round(wall["import_torch"], 3),
              "ratio": round(wall["sample_help"] / wall["import_torch"], 3),
              "sample_help_cpu_s": round(cpu["sample_help"], 3), "import_torch_cpu_s": round(cpu["import_torch"], 3),
              "cpu_ratio": round(cpu["sample_help"] / cpu["import_torch"], 3), "rounds": args.rounds,
              "all_s": {name: [round(t, 3) for t in values] for name, values in walls.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
