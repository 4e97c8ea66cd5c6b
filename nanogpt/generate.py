"""Sampling from a trained model: load a checkpoint (no dataset needed) and generate text.

    python sample.py --ckpt RUN_DIR_OR_FILE [--prompt TEXT | --prompt_file FILE] [--num_samples N]
                     [--max_new_tokens N] [--temperature T] [--top_k K] [--seed S] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import CharTokenizer


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint file, or a run dir's best checkpoint (else its last)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "best.ckpt", p / "checkpoints" / "last.ckpt", p / "best.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise NanoGPTError(f"run dir {path} holds no checkpoints/best.ckpt or checkpoints/last.ckpt; train it first")
    if not p.is_file():
        raise NanoGPTError(f"checkpoint {path} does not exist; pass a .ckpt file or a run dir")
    return p


def load_checkpoint(path: str, device: str = "cpu") -> tuple[GPT, CharTokenizer]:
    """Builds the model and tokenizer stored in a checkpoint (file or run dir), in eval mode on device.

    Loading never runs code from the file: torch.load(weights_only=True) takes plain data only.
    """
    file = resolve_checkpoint(path)
    try:
        ckpt = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise NanoGPTError(f"refusing to load {file}: it holds more than plain tensors and data ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, zipfile.BadZipFile) as e:
        raise NanoGPTError(f"checkpoint {file} is corrupt or truncated and cannot be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "tokenizer" not in ckpt:
        raise NanoGPTError(f"{file} is not a nanogpt checkpoint (no state_dict and tokenizer); pass one written by train.py")
    config = GPTConfig.from_dict(ckpt.get("hyper_parameters", {}))
    model = GPT(config)
    # the LightningModule keeps the network as `model`: drop that prefix (and compile's, if any)
    state = {k.removeprefix("model.").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), CharTokenizer.from_dict(ckpt["tokenizer"])


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoGPTError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def sample(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str = "\n",
    num_samples: int = 1,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: Optional[int] = None,
) -> list[str]:
    """Generates num_samples continuations of prompt, as one batch; each returned text includes the prompt."""
    if not prompt:
        raise NanoGPTError("the prompt is empty; give at least one character (the default is a newline)")
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokenizer.encode(prompt), device=device)
    idx = ids.unsqueeze(0).repeat(num_samples, 1)  # (num_samples, len(prompt))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [tokenizer.decode(row.tolist()) for row in out]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description="Generate text from a trained nanogpt checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run dir (its best, else last, checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    g.add_argument("--prompt_file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely character")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k most likely characters")
    p.add_argument("--seed", type=int, default=None, help="fix the random seed for reproducible samples")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise NanoGPTError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise NanoGPTError(f"--max_new_tokens must be 0 or more, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise NanoGPTError(f"--temperature must be 0 or more, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise NanoGPTError(f"--top_k must be at least 1, got {args.top_k}")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return "\n" if args.prompt is None else args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NanoGPTError(f"prompt file {args.prompt_file} does not exist") from None
    except UnicodeDecodeError:
        raise NanoGPTError(f"prompt file {args.prompt_file} is not UTF-8 text") from None


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of sample.py and nanogpt-sample."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        prompt = read_prompt(args)
        model, tokenizer = load_checkpoint(args.ckpt, pick_device(args.device))
        texts = sample(
            model, tokenizer, prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    except NanoGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"---------- sample {i + 1} ----------")
        print(text)
