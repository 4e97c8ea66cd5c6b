"""Corpus benchmark: encoding throughput, cache hits, and peak memory while encoding and training on big corpora.

    python benchmarks/data_speed.py [--sizes_mb 100 2048] [--steps 5] [--workdir /tmp]
    python benchmarks/data_speed.py --tokenizer bpe --text tinyshakespeare.txt [--sizes_mb 100 400]
    python benchmarks/data_speed.py --tokenizer tokenizer.json --text tinyshakespeare.txt --sizes_mb 100 2048

For each size, writes a generated ASCII corpus into a temporary folder under --workdir, then runs three fresh
processes (so each peak RSS is its own): encode it into an empty cache, load it again from the cache, and train
a tiny model a few steps on it through TextDataModule. Everything generated is deleted afterwards. The last line
printed is one JSON object: encode_mb_per_s (the largest corpus, both passes: vocabulary and encoding, one core;
wall clock, and encode_mb_per_cpu_s per CPU second, which a busy shared machine does not distort),
peak_rss_mb_small / peak_rss_mb_large (the larger of the encoding and training peaks), cache_hit_s (largest
corpus), and the per-size figures. Target: peak RSS of the largest corpus within 1.3x of the smallest.

With --tokenizer bpe the corpus is --text tiled to each size (a BPE needs words, not random characters); the
first pass trains the BPE (--bpe_vocab_size) instead of collecting characters, and bpe_encode_mb_per_s times
the encoding alone (the Rust tokenizer's batch encoding on all cores; target: at least 5 MB/s on 2 cores).
With --tokenizer FILE (a tokenizer.json, or a folder holding one: --data.tokenizer's path form) nothing is trained:
the first pass is the encoding alone, so a 2 GB corpus takes one encoding pass (bpe_encode is not run again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# about the characters of English prose, newlines included
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n", dtype=np.uint8)


def write_corpus(path: Path, n_bytes: int, chunk: int = 1 << 24) -> None:
    """n_bytes of random characters of ALPHABET, written chunk by chunk (memory stays bounded)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, n_bytes, chunk):
            f.write(ALPHABET[rng.integers(0, len(ALPHABET), size=min(chunk, n_bytes - start))].tobytes())


def tile_corpus(path: Path, n_bytes: int, text: Path) -> None:
    """n_bytes of text repeated (and cut at the end), written one copy at a time."""
    data = text.read_bytes()
    with open(path, "wb") as f:
        for start in range(0, n_bytes, len(data)):
            f.write(data[: n_bytes - start])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(task: str, source: str, cache: str, steps: int, tokenizer: dict) -> dict:
    """One measurement in this (fresh) process."""
    from nanogpt.data.token_cache import CorpusConfig, prepare_corpus

    if task == "bpe_encode":  # the tokenizer from the cache entry; then the encoding alone, nothing written
        from nanogpt.tokenizers.bpe import subword_batches

        tok = prepare_corpus(CorpusConfig(source=source, **tokenizer), cache).tokenizer
        with open(source, encoding="utf-8") as f:
            chunks = iter(lambda: f.read(1 << 20), "")
            start, cpu_start = time.perf_counter(), time.process_time()
            n = sum(len(ids) for ids in subword_batches(chunks, tok, np.uint16))
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
                "tokens": n, "peak_rss_mb": peak_rss_mb()}
    if task in ("encode", "hit"):
        start, cpu_start = time.perf_counter(), time.process_time()
        corpus = prepare_corpus(CorpusConfig(source=source, **tokenizer), cache)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        assert corpus.from_cache == (task == "hit")
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": len(corpus.train),
                "peak_rss_mb": peak_rss_mb()}

    import lightning as L

    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.training.module import GPTModule

    dm = TextDataModule(source=source, batch_size=16, block_size=64, val_blocks=16, cache_dir=cache, **tokenizer)
    model = GPTModule(vocab_size=dm.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, max_steps=steps, val_check_interval=steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return {"seconds": time.perf_counter() - start, "steps": trainer.global_step, "peak_rss_mb": peak_rss_mb()}


def run_child(task: str, source: Path, cache: Path, steps: int, tokenizer: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--source", str(source), "--cache", str(cache),
           "--steps", str(steps), *[arg for k, v in tokenizer.items() for arg in (f"--{k}", str(v))]]
    # the child imports nanogpt from this checkout, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 2048])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--tokenizer", default="char", help="char, bpe, or a tokenizer.json (or a folder holding one)")
    p.add_argument("--bpe_vocab_size", type=int, default=2048)
    p.add_argument("--text", type=Path, default=None, help="with --tokenizer bpe: the text tiled into each corpus")
    p.add_argument("--child", choices=["encode", "hit", "train", "bpe_encode"], help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    subword = args.tokenizer != "char"
    if args.tokenizer not in ("char", "bpe"):
        args.tokenizer = str(Path(args.tokenizer).resolve())  # the children run in other dirs
    tokenizer = {"tokenizer": args.tokenizer}
    if args.tokenizer == "bpe":
        tokenizer["bpe_vocab_size"] = args.bpe_vocab_size
    if subword and args.text is None and not args.child:
        p.error(f"--tokenizer {args.tokenizer} needs --text FILE (e.g. tiny-shakespeare's input.txt), tiled to each size")
    if args.child:
        print(json.dumps(child(args.child, args.source, args.cache, args.steps, tokenizer)))
        return

    sizes = {}
    for mb in sorted(args.sizes_mb):
        work = Path(tempfile.mkdtemp(prefix="nanogpt-bench-", dir=args.workdir))
        try:
            corpus = work / "corpus.txt"
            start = time.perf_counter()
            if subword:
                tile_corpus(corpus, mb * 10**6, args.text)
            else:
                write_corpus(corpus, mb * 10**6)
            print(f"{mb} MB corpus written in {time.perf_counter() - start:.1f}s", file=sys.stderr)
            encode = run_child("encode", corpus, work / "cache", args.steps, tokenizer)
            hit = run_child("hit", corpus, work / "cache", args.steps, tokenizer)
            train = run_child("train", corpus, work / "cache", args.steps, tokenizer)
            # a trained BPE's first pass also trains it: time the encoding alone too (a file's first pass is that)
            bpe = run_child("bpe_encode", corpus, work / "cache", args.steps, tokenizer) if args.tokenizer == "bpe" else None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sizes[mb] = {
            "encode_mb_per_s": round(mb / encode["seconds"], 2),
            "encode_mb_per_cpu_s": round(mb / encode["cpu_seconds"], 2),  # per core, whatever else runs
            "encode_s": round(encode["seconds"], 2),
            "cache_hit_s": round(hit["seconds"], 4),
            "peak_rss_mb_encode": round(encode["peak_rss_mb"], 1),
            "peak_rss_mb_train": round(train["peak_rss_mb"], 1),
            "train_steps": train["steps"],
            "train_s": round(train["seconds"], 2),
        }
        if subword:
            timed = bpe or encode  # the encoding alone
            sizes[mb].update(bpe_encode_mb_per_s=round(mb / timed["seconds"], 2),
                             bpe_encode_mb_per_cpu_s=round(mb / timed["cpu_seconds"], 2),
                             peak_rss_mb_bpe_encode=round(timed["peak_rss_mb"], 1),
                             bytes_per_token=round(mb * 10**6 / timed["tokens"], 2))
        print(f"{mb} MB: {json.dumps(sizes[mb])}", file=sys.stderr)

    small, large = sizes[min(sizes)], sizes[max(sizes)]
    peak_small = max(small["peak_rss_mb_encode"], small["peak_rss_mb_train"])
    peak_large = max(large["peak_rss_mb_encode"], large["peak_rss_mb_train"])
    print(json.dumps({
        "tokenizer": args.tokenizer,
        **({"bpe_encode_mb_per_s": large["bpe_encode_mb_per_s"]} if subword else {}),
        "encode_mb_per_s": large["encode_mb_per_s"],
        "encode_mb_per_cpu_s": large["encode_mb_per_cpu_s"],
        "peak_rss_mb_small": peak_small,
        "peak_rss_mb_large": peak_large,
        "cache_hit_s": large["cache_hit_s"],
        "peak_rss_ratio": round(peak_large / peak_small, 3),
        "sizes_mb": {str(k): v for k, v in sizes.items()},
    }))


if __name__ == "__main__":
    main()
