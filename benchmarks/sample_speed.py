"""Generation speed with and without the KV cache: tokens per second for new tokens after a one-token prompt.

    python benchmarks/sample_speed.py [--configs cpu lecture] [--batch_sizes 1 8] [--new_tokens 1000]
                                  [--device cpu] [--threads N] [--compile]

Models are the configs' shapes with random weights (speed does not depend on the weights) and the
Shakespeare vocabulary size (65). Each measurement follows a short warm-up. One line per measurement, then
the last line is one JSON object for the lecture config at batch 1 (or the first config and batch measured):
{"cached_tokens_per_s", "uncached_tokens_per_s", "speedup", "config", "device", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from nanogpt.model import GPT, GPTConfig

CONFIGS = {
    "cpu": "configs/shakespeare_char_cpu.yaml",
    "lecture": "configs/shakespeare_char.yaml",
}
ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str) -> GPTConfig:
    """The network of a training config (its model: section), with dropout off as in sampling."""
    model = yaml.safe_load((ROOT / CONFIGS[name]).read_text())["model"]
    return GPTConfig.from_dict({**model, "vocab_size": 65, "dropout": 0.0})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tokens_per_s(model: GPT, batch: int, new_tokens: int, use_cache: bool, device: str, warmup: int = 16) -> float:
    """New tokens per second, over all rows of the batch (batch * new_tokens / seconds)."""
    idx = torch.zeros((batch, 1), dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    model.generate(idx, warmup, temperature=1.0, generator=gen, use_cache=use_cache)
    sync(device)
    start = time.perf_counter()
    model.generate(idx, new_tokens, temperature=1.0, generator=gen, use_cache=use_cache)
    sync(device)
    return batch * new_tokens / (time.perf_counter() - start)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["cpu", "lecture"], choices=list(CONFIGS))
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="also time a torch.compile'd forward (the cached decode step has static shapes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.configs:
        torch.manual_seed(0)
        model = GPT(model_config(name)).to(args.device).eval()
        for batch in args.batch_sizes:
            row = {"config": name, "batch": batch, "new_tokens": args.new_tokens, "device": args.device,
                   "threads": torch.get_num_threads(),
                   "cached_tokens_per_s": tokens_per_s(model, batch, args.new_tokens, True, args.device),
                   "uncached_tokens_per_s": tokens_per_s(model, batch, args.new_tokens, False, args.device)}
            if args.compile:
                compiled = GPT(model.config).to(args.device).eval()
                compiled.load_state_dict(model.state_dict())
                compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead"
                                                 if args.device.startswith("cuda") else "default")
                # a warm-up past block_size compiles every shape: the decode step and the re-prime pass
                row["compiled_cached_tokens_per_s"] = tokens_per_s(compiled, batch, args.new_tokens, True,
                                                                   args.device, warmup=model.config.block_size + 2)
            row["speedup"] = row["cached_tokens_per_s"] / row["uncached_tokens_per_s"]
            results.append(row)
            print(f"{name:8s} batch {batch}: cached {row['cached_tokens_per_s']:9.1f} tok/s, uncached "
                  f"{row['uncached_tokens_per_s']:9.1f} tok/s, speedup {row['speedup']:5.1f}x", flush=True)
    final = next((r for r in results if r["config"] == "lecture" and r["batch"] == 1), results[0])
    keys = ("cached_tokens_per_s", "uncached_tokens_per_s", "speedup", "config", "device", "batch", "new_tokens",
            "threads", "compiled_cached_tokens_per_s")
    print(json.dumps({k: round(final[k], 2) if isinstance(final[k], float) else final[k]
                      for k in keys if k in final}))


if __name__ == "__main__":
    main()
