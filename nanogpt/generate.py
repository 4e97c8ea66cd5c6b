"""Sampling from a trained model: load a checkpoint (no dataset needed) and generate text.

    python sample.py --ckpt RUN_DIR_OR_FILE [--prompt TEXT | --prompt_file FILE] [--num_samples N]
                     [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--stop STRING]
                     [--seed S] [--stream] [--no_cache] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator, Optional

import torch

from nanogpt.io import load_checkpoint
from nanogpt.errors import ArgumentParser, NanoGPTError, reported_errors
from nanogpt.model import GPT
from nanogpt.tokenizers.char import StreamDecoding, Tokenizer, describe_chars



def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoGPTError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def check_sampling(
    num_samples: int = 1,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: Optional[float] = None,
    stop: Optional[str] = None,
    flag: str = "",
) -> None:
    """Rejects sampling values that make no sense, naming each as `flag + name` (e.g. "--top_p")."""
    if num_samples < 1:
        raise NanoGPTError(f"{flag}num_samples must be at least 1, got {num_samples}")
    if max_new_tokens < 0:
        raise NanoGPTError(f"{flag}max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not temperature >= 0:  # also catches nan
        raise NanoGPTError(f"{flag}temperature must be 0 or more (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise NanoGPTError(f"{flag}top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise NanoGPTError(f"{flag}top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    if stop is not None and not stop:
        raise NanoGPTError(f"{flag}stop is empty; give at least one character or leave it out")


def _held_back(text: str, stop: str) -> int:
    """Length of text's longest proper-suffix that begins stop: characters not yet safe to show."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "\n",
    num_samples: int = 1,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: Optional[int] = None,
    top_p: Optional[float] = None,
    stop: Optional[str] = None,
    use_cache: bool = True,
) -> Iterator[list[str]]:
    """Generates num_samples continuations of prompt as one batch, yielding each sample's new text as it comes.

    Every yield is a list of num_samples strings, possibly empty: a token that ends inside a multi-byte
    character yields nothing until the character is complete. A sample ends before the first occurrence
    of stop in its generated text (stop itself is not returned), even when it spans several tokens;
    characters that might begin stop are held back until they are known not to. Generation ends when every
    sample has stopped or after max_new_tokens tokens.
    """
    check_sampling(num_samples, max_new_tokens, temperature, top_k, top_p, stop)
    if not prompt:
        raise NanoGPTError("the prompt is empty; give at least one character (the default is a newline)")
    if stop is not None and tokenizer.unknown_chars(stop):
        raise NanoGPTError(
            f"the stop string {stop!r} has characters not in the model's vocabulary "
            f"({describe_chars(tokenizer.unknown_chars(stop))}), so it could never be generated"
        )
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt)
    ids = torch.as_tensor(prompt_ids, device=device)
    idx = ids.unsqueeze(0).repeat(num_samples, 1)  # (num_samples, prompt tokens)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    tokens = model.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)
    # one decoder per sample, each primed with the prompt (a subword decoder may depend on what came before)
    decoders = [tokenizer.stream_decoder(prompt_ids.tolist()) for _ in range(num_samples)]
    # a plain function around the generator: bad values fail at the call, not at the first token
    return _pieces(tokens, decoders, stop)


def _pieces(
    tokens: Iterator[torch.Tensor], decoders: list[StreamDecoding], stop: Optional[str]
) -> Iterator[list[str]]:
    """Turns the model's (num_samples, 1) token steps into each sample's new text, cut at stop (see stream)."""
    num_samples = len(decoders)
    texts = [""] * num_samples  # each sample's generated text so far
    shown = [0] * num_samples  # how much of it was yielded
    done = [False] * num_samples
    try:
        for step in tokens:  # step: (num_samples, 1)
            out = []
            for i, token in enumerate(step[:, 0].tolist()):
                if done[i]:
                    out.append("")
                    continue
                piece = decoders[i].step(token)  # '' while a character is incomplete
                before = len(texts[i])
                texts[i] += piece
                end = len(texts[i])
                if stop is not None:
                    # a new occurrence of stop ends inside the new piece, so it starts after before - len(stop)
                    hit = texts[i].find(stop, max(0, before - len(stop) + 1)) if piece else -1
                    if hit >= 0:
                        texts[i], end, done[i] = texts[i][:hit], hit, True
                    else:
                        end -= _held_back(texts[i], stop)
                out.append(texts[i][shown[i] : end])
                shown[i] = end
            yield out
            if all(done):
                break
    finally:
        tokens.close()  # frees the KV cache even when the caller stops early
    if not all(done):
        # the length ran out: what was held back for a possible stop is final now
        yield [t[n:] for t, n in zip(texts, shown)]


def sample(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "\n",
    num_samples: int = 1,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: Optional[int] = None,
    top_p: Optional[float] = None,
    stop: Optional[str] = None,
    use_cache: bool = True,
) -> list[str]:
    """Generates num_samples continuations of prompt, as one batch; each returned text includes the prompt.

    temperature 0 is greedy; top_k and top_p (nucleus) restrict sampling; stop ends a sample before that
    string; the same seed gives the same texts, with or without the KV cache.
    """
    texts = [prompt] * num_samples
    for pieces in stream(model, tokenizer, prompt, num_samples, max_new_tokens, temperature, top_k, seed, top_p,
                         stop, use_cache):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts


def unescape(text: str, flag: str) -> str:
    """Turns backslash escapes typed on a command line (\\n, \\t, \\\\, \\u00e9) into the characters."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        raise NanoGPTError(
            f"{flag} {text!r} has a broken backslash escape; write a newline as \\n, a backslash as \\\\"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sample.py", description="Generate text from a trained nanogpt checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run dir (its best, else last, checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    g.add_argument("--prompt_file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: only the most likely tokens that together reach probability P")
    p.add_argument("--stop", default=None,
                   help="end a sample before this string (backslash escapes work: --stop '\\n\\n')")
    p.add_argument("--seed", type=int, default=None, help="fix the random seed for reproducible samples")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one sample)")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context every step instead of using the KV cache (same text, slower)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.stop is not None:
        args.stop = unescape(args.stop, "--stop")
    check_sampling(args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop,
                   flag="--")
    if args.stream and args.num_samples > 1:
        raise NanoGPTError("--stream prints one sample as it is generated; drop --stream or use --num_samples 1")


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
    with reported_errors():
        check_args(args)
        prompt = read_prompt(args)
        model, tokenizer = load_checkpoint(args.ckpt, pick_device(args.device))
        settings = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed, top_p=args.top_p,
                        stop=args.stop, use_cache=not args.no_cache)
        if args.stream:
            pieces = stream(model, tokenizer, prompt, **settings)
            print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece[0], end="", flush=True)
            print()
            return
        texts = sample(model, tokenizer, prompt, **settings)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"---------- sample {i + 1} ----------")
        print(text)
