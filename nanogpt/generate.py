"""Sampling from a trained model: load a checkpoint (no dataset needed) and generate text.

    python sample.py --ckpt RUN_DIR_OR_FILE [--prompt TEXT | --prompt_file FILE] [--num_samples N]
                     [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--stop STRING]
                     [--seed S] [--stream] [--no_cache] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Optional, get_args, get_type_hints

import torch

from nanogpt.errors import ArgumentParser, NanoGPTError, reported_errors
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT
from nanogpt.tokenizers.char import StreamDecoding, Tokenizer, describe_chars


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoGPTError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: shared by sample, stream, sample.py's flags (one --NAME each, defaults from here) and the demo.

    temperature 0 is greedy; top_k and top_p (nucleus) narrow the choice; stop ends a sample before that string;
    the same seed gives the same texts, with or without the KV cache (use_cache False: sample.py's --no_cache).
    """

    num_samples: int = 1
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: Optional[float] = None
    stop: Optional[str] = None
    seed: Optional[int] = None
    use_cache: bool = True

    def check(self, flag: str = "") -> None:
        """Rejects values that make no sense, naming each as `flag + name` (e.g. "--top_p")."""
        if self.num_samples < 1:
            raise NanoGPTError(f"{flag}num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise NanoGPTError(f"{flag}max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also catches nan
            raise NanoGPTError(f"{flag}temperature must be 0 or more (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise NanoGPTError(f"{flag}top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise NanoGPTError(f"{flag}top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.stop is not None and not self.stop:
            raise NanoGPTError(f"{flag}stop is empty; give at least one character or leave it out")


# sample.py's help for the settings whose flag needs one (the flag of each is --NAME, use_cache's --no_cache)
SETTING_HELP = {
    "temperature": "0 picks the most likely token",
    "top_k": "sample only among the k most likely tokens",
    "top_p": "nucleus sampling: only the most likely tokens that together reach probability P",
    "stop": "end a sample before this string (backslash escapes work: --stop '\\n\\n')",
    "seed": "fix the random seed for reproducible samples",
}


def _settings(settings: Optional[SamplingSettings], overrides: dict[str, Any]) -> SamplingSettings:
    """settings (default: the defaults) with the fields named in overrides replaced."""
    return replace(settings or SamplingSettings(), **overrides)


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
    settings: Optional[SamplingSettings] = None,
    **overrides: Any,
) -> Iterator[list[str]]:
    """Generates num_samples continuations of prompt as one batch, yielding each sample's new text as it comes.

    Every yield is a list of num_samples strings, possibly empty: a token that ends inside a multi-byte
    character yields nothing until the character is complete. A sample ends before the first occurrence
    of stop in its generated text (stop itself is not returned), even when it spans several tokens;
    characters that might begin stop are held back until they are known not to. Generation ends when every
    sample has stopped or after max_new_tokens tokens. overrides replace fields of settings (SamplingSettings).
    """
    settings = _settings(settings, overrides)
    settings.check()
    stop, num_samples = settings.stop, settings.num_samples
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
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    tokens = model.generate_tokens(idx, settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                   generator, settings.use_cache)
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
    settings: Optional[SamplingSettings] = None,
    **overrides: Any,
) -> list[str]:
    """Generates num_samples continuations of prompt, as one batch; each returned text includes the prompt.

    settings (with overrides, e.g. max_new_tokens=100) say how: see SamplingSettings.
    """
    settings = _settings(settings, overrides)
    texts = [prompt] * settings.num_samples
    for pieces in stream(model, tokenizer, prompt, settings):
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
    hints = get_type_hints(SamplingSettings)
    for f in fields(SamplingSettings):
        if f.name == "use_cache":
            p.add_argument("--no_cache", dest="use_cache", action="store_false",
                           help="recompute the whole context every step instead of using the KV cache (same text, "
                           "slower)")
        else:
            kind = next((a for a in get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # Optional[X]: X
            p.add_argument(f"--{f.name}", type=kind, default=f.default, help=SETTING_HELP.get(f.name))
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one sample)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def settings_of(args: argparse.Namespace) -> SamplingSettings:
    """The sampling settings of sample.py's flags, checked (a mistake names its flag)."""
    values = {f.name: getattr(args, f.name) for f in fields(SamplingSettings)}
    if values["stop"] is not None:
        values["stop"] = unescape(values["stop"], "--stop")
    settings = SamplingSettings(**values)
    settings.check(flag="--")
    if args.stream and settings.num_samples > 1:
        raise NanoGPTError("--stream prints one sample as it is generated; drop --stream or use --num_samples 1")
    return settings


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
        settings = settings_of(args)
        prompt = read_prompt(args)
        model, tokenizer = load_checkpoint(args.ckpt, pick_device(args.device))
        if args.stream:
            pieces = stream(model, tokenizer, prompt, settings)
            print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece[0], end="", flush=True)
            print()
            return
        texts = sample(model, tokenizer, prompt, settings)
    for i, text in enumerate(texts):
        if settings.num_samples > 1:
            print(f"---------- sample {i + 1} ----------")
        print(text)
