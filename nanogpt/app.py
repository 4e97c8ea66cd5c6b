"""The web demo: a Gradio app that streams text from a trained checkpoint (needs `pip install -e ".[app]"`).

    python app.py --ckpt RUN_DIR_OR_FILE [--host 127.0.0.1] [--port 7860] [--max_length 2000] [--device auto]

It binds to loopback unless --host says otherwise (on Hugging Face Spaces, GRADIO_SERVER_NAME=0.0.0.0
sets the default) and never sends Gradio's usage analytics.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, Optional

from nanogpt.errors import ArgumentParser, NanoGPTError, reported_errors
from nanogpt.generate import SamplingSettings, pick_device, stream
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT
from nanogpt.tokenizers.char import Tokenizer


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    max_length: int,
) -> Iterator[str]:
    """Yields the prompt plus the text generated so far, growing as tokens come (whole characters only);
    length, in tokens, is capped. The values come from the page's sliders (floats), hence the conversions."""
    settings = SamplingSettings(max_new_tokens=max(0, min(int(length), max_length)), temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p), seed=int(seed))
    text = prompt
    for piece in stream(model, tokenizer, prompt, settings):
        text += piece[0]
        yield text


def build_demo(model: GPT, tokenizer: Tokenizer, max_length: int = 2000, title: str = "nanogpt") -> Any:
    """The Gradio Blocks app around one loaded model; generate_text is exposed as the API `/generate`."""
    import gradio as gr

    def generate(prompt: str, length: float, temperature: float, top_k: float, top_p: float, seed: float):
        try:
            yield from generate_text(model, tokenizer, prompt, length, temperature, top_k, top_p, seed, max_length)
        except NanoGPTError as e:
            # e.g. characters outside the vocabulary: a message in the page, not a crash
            raise gr.Error(str(e)) from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        unit, defaults = tokenizer.unit, SamplingSettings()
        gr.Markdown(f"# {title}\nA GPT ({model.num_params() / 1e6:.2f}M parameters, context "
                    f"{model.config.block_size} tokens, tokenizer {tokenizer.describe()}). "
                    "Type a prompt and press Generate.")
        prompt = gr.Textbox(label="Prompt", value="ROMEO:", lines=3)
        with gr.Row():
            length = gr.Slider(1, max_length, value=min(defaults.max_new_tokens, max_length), step=1,
                               label=f"{unit.capitalize()} to generate")
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                    label="Temperature (0 = most likely)")
        with gr.Row():
            top_k = gr.Slider(1, tokenizer.vocab_size, value=tokenizer.vocab_size, step=1, label="Top-k")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            seed = gr.Slider(0, 10_000, value=1337, step=1, label="Seed")
        button = gr.Button("Generate", variant="primary")
        output = gr.Textbox(label="Output", lines=20)
        # one generation at a time: the KV caches live in the one shared model
        button.click(generate, [prompt, length, temperature, top_k, top_p, seed], output, api_name="generate",
                     concurrency_limit=1)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="app.py", description="Web demo: generate text from a nanogpt checkpoint.")
    p.add_argument("--ckpt", default="out/shakespeare_char",
                   help="a checkpoint file, or a run dir (its best, else last, checkpoint)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--max_length", type=int, default=2000, help="the most tokens one request may generate")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of app.py and nanogpt-app."""
    args = build_parser().parse_args(argv)
    # before gradio is imported: it reads this at import and would otherwise phone home
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    with reported_errors():
        if args.max_length < 1:
            raise NanoGPTError(f"--max_length must be at least 1, got {args.max_length}")
        if not 0 < args.port < 65536:
            raise NanoGPTError(f"--port must be in 1..65535, got {args.port}")
        model, tokenizer = load_checkpoint(args.ckpt, pick_device(args.device))
        try:
            import gradio  # noqa: F401  (slow to import: after the quick checks)
        except ImportError:
            raise NanoGPTError('the web demo needs gradio: pip install -e ".[app]"') from None
    demo = build_demo(model, tokenizer, args.max_length)
    try:
        demo.queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port} ({e}); pick another --port", file=sys.stderr)
        sys.exit(2)
