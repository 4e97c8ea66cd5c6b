"""Measure a model on any text: loss, perplexity and bits per byte (and per character, for character models).

    nanogpt-eval --ckpt RUN|FILE|HF_FOLDER|hf:NAME --source ANY [--max_tokens N] [--block_size T] [--stride S]
                 [--batch_size B] [--device auto|cpu|cuda] [--devices N]
    nanogpt-eval --ckpt RUN --split val        # the run's own validation blocks: its logged val/loss

The text is read like --data.source (a file, a folder, .jsonl/.csv/.parquet, a saved dataset or hf:NAME) and
encoded with the model's own tokenizer. It is cut into full-context windows of block_size tokens: without
--stride they do not overlap; with --stride S each window starts S tokens after the previous one and scores only
the tokens the previous one did not, so every token after the first is scored once, with at least
block_size - S tokens of context. A last window is aligned with the end of the text, so none is left out.

The result is a function of the text, the model and (block_size, stride, batch_size) only: on N devices (Fabric,
e.g. N CPU processes over gloo) batch i of windows runs on rank i mod N, every window's sums are gathered
and added up in window order, so 1 and N devices give the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from torch.nn import functional as F

from nanogpt.data.sources import SourceFlags, open_source
from nanogpt.data.splits import run_validation_blocks
from nanogpt.data.token_cache import encode_text, token_dtype
from nanogpt.errors import NanoGPTError, hide_srun_hint, reported_errors
from nanogpt.hf.pretrained import load_pretrained, pretrained_tokenizer
from nanogpt.io import load_checkpoint, resolve_checkpoint
from nanogpt.model import GPT
from nanogpt.tokenizers.char import Tokenizer, describe_chars

# the flags nanogpt-eval reads its text with: a source's errors name these
EVAL_FLAGS = SourceFlags(source="--source", split="--hf_split", glob="--glob", text_column="--text_column",
                         hf_config="--hf_config")


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """(vocab_size,) UTF-8 bytes each token stands for: bits per byte divide the summed loss by these."""
    counts = tokenizer.token_bytes()
    if counts is None:  # not byte-level (e.g. an exported character vocabulary): each token decodes on its own
        counts = np.array([len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)])
    return np.asarray(counts, dtype=np.int64)


def load_model(spec: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """A model and its tokenizer from a train.py checkpoint or run dir, a Hugging Face GPT-2 folder, or hf:NAME."""
    path = Path(spec).expanduser()
    if spec.startswith("hf:") or (path.is_dir() and (path / "config.json").is_file()):
        return load_pretrained(spec).to(device), pretrained_tokenizer(spec)
    return load_checkpoint(spec, device)


def encode_source(source: str, tokenizer: Tokenizer, max_tokens: Optional[int] = None, separator: str = "\n\n",
                  **reader: Any) -> np.ndarray:
    """The source's text as token ids (its first max_tokens), read in chunks by the package's source readers
    (reader: open_source's split, glob, text_column and hf_config) with separator between documents, and encoded
    the way the token cache encodes a corpus."""
    text = open_source(source, **reader, flags=EVAL_FLAGS).text(separator)
    parts: list[np.ndarray] = []
    _, unknown = encode_text(text, tokenizer, parts.append, max_tokens=max_tokens)
    if unknown:
        raise NanoGPTError(f"{source} has characters outside the model's vocabulary: {describe_chars(unknown)}; "
                           "remove them from the text (a character model knows only its training characters)")
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))
    return tokens[:max_tokens] if max_tokens is not None else tokens


@dataclass
class Windows:
    """Where each window starts in the tokens, and from which of its block_size targets it scores (the rest were
    scored by an earlier window)."""

    starts: np.ndarray  # (W,)
    first_scored: np.ndarray  # (W,)
    block_size: int


def sliding_windows(n_tokens: int, block_size: int, stride: Optional[int] = None) -> Windows:
    """Full-context windows over n_tokens tokens, stride apart (default block_size: no overlap), the last one
    aligned with the end; window w reads tokens [s, s + block_size] and predicts the last block_size of them."""
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise NanoGPTError(f"--stride must be between 1 and the block size ({block_size}), got {stride}")
    last = n_tokens - block_size - 1
    if last < 0:
        raise NanoGPTError(f"the text has {n_tokens} tokens, fewer than one window (block_size + 1 = "
                           f"{block_size + 1}); use more text, a larger --max_tokens or a smaller --block_size")
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, last)
    # targets of window s are tokens s+1 .. s+block_size; the previous window's reach up to prev + block_size
    first = np.zeros(len(starts), dtype=np.int64)
    first[1:] = starts[:-1] + block_size - starts[1:]
    return Windows(starts, np.maximum(first, 0), block_size)


def fixed_windows(starts: np.ndarray, block_size: int) -> Windows:
    """Given windows that each score all their targets (the validation blocks of a run)."""
    return Windows(np.asarray(starts, dtype=np.int64), np.zeros(len(starts), dtype=np.int64), block_size)


@torch.no_grad()
def window_sums(model: GPT, tokens: np.ndarray, windows: Windows, byte_counts: np.ndarray, batch_size: int,
                rank: int = 0, world_size: int = 1, autocast: Callable[[], Any] = nullcontext) -> torch.Tensor:
    """(W, 3) float64: each window's summed loss in nats, scored tokens and their UTF-8 bytes; zeros in the rows
    of windows another rank computes (batch i of windows is rank i mod world_size's)."""
    device = next(model.parameters()).device
    T, n = windows.block_size, len(windows.starts)
    sums = torch.zeros(n, 3, dtype=torch.float64)
    offsets = np.arange(T + 1)
    for b, lo in enumerate(range(0, n, batch_size)):
        if b % world_size != rank:
            continue
        starts = windows.starts[lo : lo + batch_size]
        block = torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64))  # (B, T + 1)
        x, y = block[:, :-1].to(device), block[:, 1:]
        with autocast():  # the precision's autocast (none in full precision)
            logits, _ = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device), reduction="none")
        scored = torch.arange(T)[None, :] >= torch.from_numpy(windows.first_scored[lo : lo + batch_size])[:, None]
        loss = loss.view(len(starts), T).cpu().double() * scored  # (B, T)
        sums[lo : lo + len(starts), 0] = loss.sum(1)
        sums[lo : lo + len(starts), 1] = scored.sum(1).double()
        sums[lo : lo + len(starts), 2] = (torch.from_numpy(byte_counts[y.numpy()]) * scored).sum(1).double()
    return sums


def summarize(sums: torch.Tensor, char_model: bool) -> dict[str, float]:
    """Loss (nats per token), perplexity, bits per UTF-8 byte (and per character) from window_sums' rows."""
    total = sums.sum(0).tolist()  # in window order: the same on any number of ranks
    nats, n_tokens, n_bytes = total
    loss = nats / n_tokens
    out = {"loss": loss, "perplexity": math.exp(loss), "bpb": nats / math.log(2) / n_bytes,
           "tokens": int(n_tokens), "bytes": int(n_bytes)}
    if char_model:
        out["bpc"] = loss / math.log(2)
    return out


def run_dir_of(spec: str, split: str) -> Path:
    """The run dir of a train.py checkpoint or run dir: where its config.yaml (its data settings) lives."""
    path = Path(spec).expanduser()
    run = path if path.is_dir() else resolve_checkpoint(spec).parent.parent
    if not (run / "config.yaml").is_file():
        raise NanoGPTError(f"--split {split} evaluates a run's own data, read from RUN/config.yaml, and {run} has "
                           "none; pass the run dir of a train.py run, or --source TEXT instead")
    return run


def run_split_tokens(spec: str, split: str, block_size: int) -> tuple[np.ndarray, Windows]:
    """The run's validation tokens and the very blocks its val/loss is computed on (as its DataModule serves them)."""
    run = run_dir_of(spec, split)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    tokens, starts = run_validation_blocks(config.get("data") or {}, block_size)
    return tokens, fixed_windows(starts, block_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanogpt-eval", description="Measure a model's loss, perplexity and bits per "
                                "byte on any text.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint or run dir, a Hugging Face GPT-2 folder, or "
                   "hf:NAME from the Hugging Face cache")
    p.add_argument("--source", default=None, help="the text: a file, a folder, .jsonl/.csv/.parquet, a saved dataset "
                   "or hf:NAME (as --data.source)")
    p.add_argument("--split", default=None, choices=["val"],
                   help="instead of --source: the run's own validation blocks (the figure it logs as val/loss)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding windows S tokens apart (default: block_size, no overlap)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes over gloo)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"],
                   help="compute precision (32-true matches a full-precision run's val/loss exactly)")
    for name, default, what in (("glob", "*.txt", "files read from a folder"), ("text_column", "text", "column of "
                                "the text in tables and datasets"), ("hf_config", None, "dataset configuration of "
                                "hf: sources"), ("hf_split", "train", "split of hf: sources and saved datasets"),
                                ("separator", "\n\n", "put between documents")):
        p.add_argument(f"--{name}", default=default, help=f"{what} (as --data.{name})")
    return p


def check_args(args: argparse.Namespace) -> None:
    if (args.source is None) == (args.split is None):
        raise NanoGPTError("pass either --source TEXT (any text) or --split val (the run's own validation blocks)")
    for name in ("max_tokens", "block_size", "stride", "batch_size", "devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise NanoGPTError(f"--{name} must be a positive integer, got {value}")
    if args.split is not None and (args.max_tokens is not None or args.stride is not None):
        raise NanoGPTError("--split val evaluates the run's validation blocks as they are; drop --max_tokens/--stride")


def evaluate(args: argparse.Namespace, fabric: Any) -> Optional[dict[str, Any]]:
    """Runs the evaluation on this process's share; returns the figures (on every rank)."""
    model, tokenizer = load_model(args.ckpt, "cpu")
    model = model.to(fabric.device).eval()
    block_size = args.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise NanoGPTError(f"--block_size {block_size} is above the model's block_size ({model.config.block_size}); "
                           f"use {model.config.block_size} or less")
    if args.split is not None:
        tokens, windows = run_split_tokens(args.ckpt, args.split, block_size)
    else:
        tokens = encode_source(args.source, tokenizer, args.max_tokens, args.separator, split=args.hf_split,
                               glob=args.glob, text_column=args.text_column, hf_config=args.hf_config)
        windows = sliding_windows(len(tokens), block_size, args.stride)
    sums = window_sums(model, tokens, windows, token_bytes(tokenizer), args.batch_size, fabric.global_rank,
                       fabric.world_size, fabric.autocast)
    if fabric.world_size > 1:
        sums = fabric.all_reduce(sums.to(fabric.device), reduce_op="sum").cpu()  # each row from one rank, others 0
    result = summarize(sums, tokenizer.kind == "char")
    result.update(windows=len(windows.starts), block_size=block_size,
                  stride=None if args.split else (args.stride or block_size), ckpt=args.ckpt,
                  source=args.source if args.source is not None else f"{args.split} split of the run",
                  devices=fabric.world_size)
    return result


def report(result: dict[str, Any]) -> str:
    """A table for people, then the figures as one JSON line for programs."""
    rows = [("text", f"{result['source']}: {result['tokens']:,} tokens scored ({result['bytes']:,} bytes) in "
                     f"{result['windows']:,} windows of {result['block_size']}"),
            ("loss", f"{result['loss']:.4f} nats/token"), ("perplexity", f"{result['perplexity']:.4f}"),
            ("bpb", f"{result['bpb']:.4f} bits/byte")]
    if "bpc" in result:
        rows.append(("bpc", f"{result['bpc']:.4f} bits/character"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + "\n" + json.dumps(result)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of nanogpt-eval."""
    args = build_parser().parse_args(argv)
    with reported_errors():
        check_args(args)
        hide_srun_hint()
        import lightning as L

        from nanogpt.generate import pick_device

        device = pick_device(args.device)
        accelerator = "gpu" if device == "cuda" else "cpu"
        strategy = "ddp" if args.devices > 1 else "auto"
        precision, plugins = args.precision, None
        if precision == "16-mixed" and accelerator == "cpu":
            # Lightning would compute in bf16 instead (with a warning); torch autocasts fp16 on CPUs: run what was asked
            from lightning.fabric.plugins import MixedPrecision

            precision, plugins = None, MixedPrecision("16-mixed", "cpu")
        fabric = L.Fabric(accelerator=accelerator, devices=args.devices, strategy=strategy, precision=precision,
                          plugins=plugins)
        fabric.launch()
        result = evaluate(args, fabric)
    if fabric.global_rank == 0:
        print(report(result))


if __name__ == "__main__":
    main()
