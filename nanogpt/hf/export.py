"""Export a checkpoint as a Hugging Face GPT-2 folder: config.json, model.safetensors and the vocabulary.

    nanogpt-export --ckpt RUN_DIR_OR_FILE --out DIR [--overwrite]

`transformers.GPT2LMHeadModel.from_pretrained(DIR)` then computes the same logits as our model, and
`transformers.AutoTokenizer.from_pretrained(DIR)` encodes text to the same ids, with the model's own
tokenizer (characters, or the subword tokenizer.json it was trained with; with GPT-2's tokenizer the folder
is a drop-in GPT-2 folder). The padding rows of a subword model's embedding are left out: config.json's
vocab_size is the real vocabulary, as in GPT-2's own folder (50257). Our network is
GPT-2's, so every option maps exactly: ReLU is GPT-2's `activation_function: relu`, and a model without
biases becomes one whose biases are zero. GPT-2 stores its linear layers as Conv1D, (in, out) weights,
so ours (out, in) are transposed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

from nanogpt.errors import ArgumentParser, NanoGPTError, reported_errors
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT, GPTConfig, marked
from nanogpt.hf.pretrained import ACTIVATIONS_TO_GPT2, to_gpt2_state_dict
from nanogpt.tokenizers.char import CharTokenizer, Tokenizer

# the GPTConfig fields this exporter maps; any other field is a model option GPT-2 may not have
MAPPED_FIELDS = marked(GPTConfig, "exported")


def check_exportable(config: GPTConfig) -> None:
    """Refuses a model with options (fields added to GPTConfig later) that this exporter does not map."""
    default = GPTConfig()
    for f in fields(GPTConfig):
        if f.name not in MAPPED_FIELDS and getattr(config, f.name) != getattr(default, f.name):
            raise NanoGPTError(
                f"model.{f.name}={getattr(config, f.name)!r} has no GPT-2 equivalent that the exporter knows; "
                f"only models with the default {f.name} ({getattr(default, f.name)!r}) can be exported"
            )


def gpt2_config(config: GPTConfig, eos_token_id: Optional[int] = None) -> dict:
    """The config.json of a transformers GPT2LMHeadModel with our model's shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        # transformers' "gelu" is the exact erf GELU of nn.GELU(); its GPT-2 default "gelu_new" is the tanh one
        "activation_function": ACTIVATIONS_TO_GPT2[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        # a character vocabulary has no special tokens; GPT-2's <|endoftext|> is both
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layouts. The tied lm_head is stored once, as transformer.wte."""
    out = to_gpt2_state_dict(model.state_dict(), model.config.vocab_size)
    if not model.config.bias:
        # GPT-2 always has biases: zero ones compute exactly what no bias does
        C = model.config.n_embd
        for i in range(model.config.n_layer):
            h = f"transformer.h.{i}."
            sizes = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
            for layer, n in sizes.items():
                out[h + layer + ".bias"] = torch.zeros(n, dtype=model.transformer.wte.weight.dtype)
        out["transformer.ln_f.bias"] = torch.zeros(C, dtype=model.transformer.wte.weight.dtype)
    # safetensors wants contiguous CPU tensors that share no memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, dict | str]:
    """The tokenizer's files: a character vocabulary's (see char_tokenizer_files), or a subword one's."""
    if isinstance(tokenizer, CharTokenizer):
        return char_tokenizer_files(tokenizer)
    return subword_tokenizer_files(tokenizer)


def char_tokenizer_files(tokenizer: CharTokenizer) -> dict[str, dict | str]:
    """The vocabulary as vocab.json ({char: id}) and a `tokenizers` file that AutoTokenizer loads.

    The tokenizer is a BPE without merges and without pre-tokenization, so every character is one token,
    and a Fuse decoder, so decoding joins the characters without spaces: exactly CharTokenizer.
    """
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    fast = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": None,
        "clean_up_tokenization_spaces": False,
    }
    return {"vocab.json": vocab, "tokenizer.json": fast, "tokenizer_config.json": config}


def subword_tokenizer_files(tokenizer: Any) -> dict[str, dict | str]:
    """The checkpoint's own tokenizer.json, a tokenizer_config.json, and for a BPE vocab.json and merges.txt.

    A byte-level BPE with GPT-2's <|endoftext|> loads as GPT2Tokenizer with it as BOS, EOS and UNK, as GPT-2's
    own folder does; any other loads as PreTrainedTokenizerFast, exactly as its tokenizer.json says.
    """
    spec = json.loads(tokenizer.to_dict()["json"])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": None,
                              "clean_up_tokenization_spaces": False}
    if tokenizer.byte_level and endoftext_id(tokenizer) is not None:
        config.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, bos_token=ENDOFTEXT,
                      eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    files: dict[str, dict | str] = {"tokenizer.json": spec, "tokenizer_config.json": config}
    model = spec.get("model", {})
    if model.get("type") == "BPE":  # the files older (slow) GPT-2 tokenizers read
        files["vocab.json"] = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        files["merges.txt"] = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    return files


ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token


def endoftext_id(tokenizer: Tokenizer) -> Optional[int]:
    """The id of a subword tokenizer's <|endoftext|> token, or None."""
    if isinstance(tokenizer, CharTokenizer):
        return None
    return tokenizer.tokenizer.token_to_id(ENDOFTEXT)


def export(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Writes the checkpoint (file or run dir) as a Hugging Face GPT-2 folder at out; returns its path.

    The folder is written beside out and renamed into place, so a failed export leaves no half folder.
    """
    from safetensors.torch import save_file

    dest = Path(out).expanduser()
    if dest.exists() and not dest.is_dir():
        raise NanoGPTError(f"--out {out} is a file; give a directory to write the model folder into")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise NanoGPTError(f"--out {out} already holds files; pick a new directory or pass --overwrite to replace it")
    model, tokenizer = load_checkpoint(ckpt, "cpu")
    check_exportable(model.config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(gpt2_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        files = {"config.json": gpt2_config(model.config, endoftext_id(tokenizer)), **tokenizer_files(tokenizer)}
        for name, data in files.items():
            text = data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of nanogpt-export."""
    p = ArgumentParser(prog="nanogpt-export", description="Export a nanogpt checkpoint as a Hugging Face "
                                "GPT-2 folder (config.json, model.safetensors, vocabulary).")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run dir (its best, else last, checkpoint)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    args = p.parse_args(argv)
    with reported_errors():
        dest = export(args.ckpt, args.out, args.overwrite)
    print(f"wrote {dest} (load it with transformers.GPT2LMHeadModel.from_pretrained({str(dest)!r}))")


if __name__ == "__main__":
    main()
