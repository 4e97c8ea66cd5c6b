"""Pretrained GPT-2 weights: a Hugging Face GPT-2 folder, or `hf:NAME` from the Hugging Face cache, as our GPT.

    model = load_pretrained("hf:gpt2")                     # or a folder: save_pretrained's, nanogpt-export's
    model = load_pretrained("path/to/folder", block_size=256)  # crops the position table (nanoGPT's crop_block_size)

A GPT-2 folder holds config.json and model.safetensors (or pytorch_model.bin, or either sharded with an index);
the .bin is read with torch.load(weights_only=True), so no file runs code. Our network is GPT-2's: only the
names and layouts differ. GPT-2 stores its linear layers as Conv1D, (in, out) weights, which are transposed into
our Linear (out, in); the output layer is tied to the token embedding in both. This module holds that mapping in
both directions: nanogpt.hf.export writes with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from nanogpt.io import safe_load
from nanogpt.errors import NanoGPTError
from nanogpt.hub import hub_folder
from nanogpt.model import GPT, GPTConfig, marked
from nanogpt.tokenizers.char import Tokenizer

SUPPORTED_MODEL_TYPES = ("gpt2",)
# the weights of GPT-2's Conv1D layers, stored (in, out): ours are nn.Linear, (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers older transformers versions saved beside the weights (the causal mask): not parameters
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# transformers' activation_function -> our model.activation; gelu_new, gelu_pytorch_tanh and gelu_fast are one
# formula, the tanh approximation of GELU; transformers' "gelu" is the exact erf one
ACTIVATIONS_FROM_GPT2 = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                         "gelu": "gelu", "relu": "relu"}
ACTIVATIONS_TO_GPT2 = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# config.json settings our network computes only at these values (transformers' defaults for GPT-2)
FIXED_OPTIONS = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "add_cross_attention": False}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def to_gpt2_state_dict(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our GPT's state dict under GPT-2's names and layouts: the tied lm_head left out (GPT-2 re-ties it), and
    the embedding cut to the vocab_size real tokens (the padding rows are never used)."""
    out = {name: p.t() if name.endswith(CONV1D) else p for name, p in state.items() if name != "lm_head.weight"}
    out["transformer.wte.weight"] = out["transformer.wte.weight"][:vocab_size]  # (vocab, C)
    return out


def from_gpt2_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (with or without the `transformer.` prefix GPT2LMHeadModel adds) under our names and
    layouts, without the mask buffers and without lm_head.weight (our model ties it to transformer.wte)."""
    prefixed = any(name.startswith("transformer.") for name in state)
    out = {}
    for name, p in state.items():
        if name.endswith(MASK_BUFFERS) or name == "lm_head.weight":
            continue
        name = name if prefixed else f"transformer.{name}"
        out[name] = p.t() if name.endswith(CONV1D) else p  # Conv1D (in, out) -> Linear (out, in)
    return out


def resolve_pretrained(spec: str) -> Path:
    """The folder of a pretrained model: a local path, or hf:NAME taken from the Hugging Face cache.

    hf:NAME is looked up in the cache first and never touches the network when it is there (or when
    HF_HUB_OFFLINE=1); otherwise it is downloaded once, config, weights and tokenizer files only.
    """
    if not spec.startswith("hf:"):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise NanoGPTError(f"pretrained model folder {spec} does not exist; pass a Hugging Face GPT-2 folder "
                               "(config.json and model.safetensors) or hf:NAME, e.g. hf:gpt2")
        return folder
    name = spec[3:]
    if not name:
        raise NanoGPTError("hf: needs a model name, e.g. hf:gpt2 or hf:gpt2-medium")
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
    return hub_folder(name, patterns, "config.json")


def read_gpt2_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked to be a GPT-2 one."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoGPTError(f"{folder} holds no config.json; pass a Hugging Face GPT-2 folder") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NanoGPTError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise NanoGPTError(
            f"{path} describes a {kind!r} model; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(GPT-2 and folders written by nanogpt-export)"
        )
    return config


@dataclass
class PretrainedShape:
    """The GPTConfig fields a GPT-2 config fixes, and the longest context its position table holds."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    activation: str
    n_positions: int


def gpt2_shape(config: dict[str, Any], where: str = "config.json") -> PretrainedShape:
    """Maps a GPT-2 config.json to our model's shape; options our network does not compute are an error."""
    try:
        n_embd, n_head = int(config["n_embd"]), int(config["n_head"])
        shape = PretrainedShape(int(config["vocab_size"]), int(config["n_layer"]), n_head, n_embd,
                                config.get("activation_function", "gelu_new"), int(config["n_positions"]))
    except (KeyError, TypeError, ValueError) as e:
        raise NanoGPTError(f"{where} lacks or garbles a GPT-2 setting ({e}); it needs vocab_size, n_layer, n_head, "
                           "n_embd and n_positions") from None
    if shape.activation not in ACTIVATIONS_FROM_GPT2:
        raise NanoGPTError(f"{where}: activation_function {shape.activation!r} is not supported; "
                           f"supported: {', '.join(ACTIVATIONS_FROM_GPT2)}")
    shape.activation = ACTIVATIONS_FROM_GPT2[shape.activation]
    unsupported = [f"{k}={config[k]!r}" for k, v in FIXED_OPTIONS.items() if k in config and config[k] != v]
    if config.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={config['n_inner']!r}")
    if unsupported:
        raise NanoGPTError(f"{where} sets {', '.join(unsupported)}, which this GPT does not compute; it supports "
                           f"GPT-2's defaults ({', '.join(f'{k}={v}' for k, v in FIXED_OPTIONS.items())}, "
                           "n_inner=4*n_embd)")
    return shape


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the folder's weights: one file, or the shards an index.json lists."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NanoGPTError(f"{path} is not a weight index (no weight_map: {e})") from None
        return [folder / shard for shard in shards]
    raise NanoGPTError(f"{folder} holds no weights; expected one of {', '.join(WEIGHT_FILES)}")


def read_gpt2_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, on the CPU. Never runs code: safetensors, or a .bin read with
    torch.load(weights_only=True)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise NanoGPTError(f"weight shard {path} is missing; download the folder again")
        if path.suffix == ".safetensors":
            try:
                part = load_file(path)
            except (SafetensorError, OSError, ValueError) as e:
                raise NanoGPTError(f"{path} is not a readable safetensors file ({e})") from None
        else:
            part = safe_load(path, map_location="cpu")
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise NanoGPTError(f"{path} is not a state dict of tensors; pass a GPT-2 pytorch_model.bin")
        state.update(part)
    return state


def _describe(names: list[str], limit: int = 6) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _has_bias(state: dict[str, torch.Tensor]) -> bool:
    """Whether any Linear or LayerNorm bias is non-zero: an all-zero set (a model exported without biases)
    computes exactly what a model without biases does, and loads as one."""
    return any(bool(p.any()) for name, p in state.items() if name.endswith(".bias") and not name.endswith(MASK_BUFFERS))


def load_pretrained(
    spec: str, block_size: Optional[int] = None, dropout: float = 0.0, bias: Optional[bool] = None
) -> GPT:
    """Our GPT with the weights of a GPT-2 folder or hf:NAME (see resolve_pretrained), on the CPU in eval mode.

    block_size defaults to the folder's n_positions; a smaller one crops the position table. bias defaults to
    what the weights hold (False when every bias is zero); True keeps zero biases as trainable ones.
    """
    folder = resolve_pretrained(spec)
    shape = gpt2_shape(read_gpt2_config(folder), where=str(folder / "config.json"))
    block_size = shape.n_positions if block_size is None else block_size
    if block_size > shape.n_positions:
        raise NanoGPTError(f"block_size {block_size} is above the pretrained model's n_positions "
                           f"({shape.n_positions}, {spec}); use --model.block_size {shape.n_positions} or less")
    raw = read_gpt2_weights(folder)
    try:
        config = GPTConfig(vocab_size=shape.vocab_size, block_size=block_size, n_layer=shape.n_layer,
                           n_head=shape.n_head, n_embd=shape.n_embd, dropout=dropout,
                           bias=_has_bias(raw) if bias is None else bias, activation=shape.activation)
    except ValueError as e:
        raise NanoGPTError(f"{folder / 'config.json'}: {e}") from None
    model = GPT(config)
    model.load_state_dict(pretrained_state_dict(raw, model, spec))
    return model.eval()


def load_pretrained_weights(model: GPT, spec: str) -> None:
    """Copies the weights of a GPT-2 folder or hf:NAME into model, whose shape must be the folder's."""
    model.load_state_dict(pretrained_state_dict(read_gpt2_weights(resolve_pretrained(spec)), model, spec))


def pretrained_state_dict(raw: dict[str, torch.Tensor], model: GPT, spec: str) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (read_gpt2_weights) as a state dict for model; a tensor that is missing, left over or
    of the wrong shape is an error naming it."""
    config = model.config
    state = from_gpt2_state_dict(raw)
    if "lm_head.weight" in raw and "transformer.wte.weight" in state:
        if not torch.equal(raw["lm_head.weight"], state["transformer.wte.weight"]):
            raise NanoGPTError(f"{spec}: lm_head.weight differs from the token embedding (transformer.wte.weight); "
                               "this GPT ties the two, so only tied GPT-2 models load")
    if not config.bias:
        if _has_bias(state):
            raise NanoGPTError(f"{spec} has non-zero biases, so it cannot load as a model without biases; "
                               "drop --model.bias false")
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    # the position table holds n_positions rows: keep the first block_size (nanoGPT's crop_block_size)
    if state.get("transformer.wpe.weight") is not None:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected["transformer.wte.weight"] = (config.vocab_size, config.n_embd)  # the file has no padding rows
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                  for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    problems = ([f"missing {_describe(missing)}"] if missing else []) + \
               ([f"unexpected {_describe(unexpected)}"] if unexpected else []) + \
               ([f"wrong shape {_describe(mismatched)}"] if mismatched else [])
    if problems:
        raise NanoGPTError(f"the weights of {spec} do not fit its config.json: {'; '.join(problems)}; "
                           "pass a complete GPT-2 folder")
    wte = state["transformer.wte.weight"]  # (vocab, C)
    if config.padded_vocab_size > config.vocab_size:
        # our embedding has padding rows past the real vocabulary (never in the data, never sampled): zeros
        wte = torch.cat([wte, wte.new_zeros(config.padded_vocab_size - config.vocab_size, wte.shape[1])])
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte  # one tensor: the two are tied
    return state


def pretrained_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer.json of a GPT-2 folder or hf:NAME (see resolve_pretrained): the model's own tokenizer."""
    from nanogpt.tokenizers.bpe import SubwordTokenizer

    folder = resolve_pretrained(spec)
    if not (folder / "tokenizer.json").is_file():
        raise NanoGPTError(f"{spec} holds no tokenizer.json, so its text cannot be encoded; add the tokenizer "
                           "transformers saved with the model (save_pretrained of a fast tokenizer)")
    return SubwordTokenizer.from_path(str(folder))


# the model.* settings a pretrained folder fixes (vocab_size comes with its tokenizer, block_size may be cropped)
PRETRAINED_FIELDS = marked(GPTConfig, "pretrained")


def weights_have_bias(folder: Path) -> bool:
    """Whether the folder's weights hold a non-zero bias (see _has_bias); safetensors read only the biases."""
    from safetensors import safe_open

    files = _weight_files(folder)
    if all(f.suffix == ".safetensors" for f in files):
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if _has_bias({k: st.get_tensor(k) for k in st.keys() if k.endswith(".bias")}):
                    return True
        return False
    return _has_bias(read_gpt2_weights(folder))


def pretrained_settings(spec: str, user_set: dict[str, Any]) -> dict[str, Any]:
    """The model.* values of a run that starts from spec: the folder's shape, and block_size its n_positions
    unless set lower. A value in user_set (the settings a user gave) that differs is an error listing them all."""
    folder = resolve_pretrained(spec)
    shape = gpt2_shape(read_gpt2_config(folder), where=str(folder / "config.json"))
    # bias is read off the weights (config.json does not say); the other fields off the config
    fixed = {k: weights_have_bias(folder) if k == "bias" else getattr(shape, k) for k in PRETRAINED_FIELDS}
    conflicts = [f"model.{k}={user_set[k]!r} (the model has {v!r})" for k, v in fixed.items()
                 if k in user_set and user_set[k] != v]
    block_size = user_set.get("block_size", shape.n_positions)
    if block_size > shape.n_positions:
        conflicts.append(f"model.block_size={block_size} (at most its n_positions, {shape.n_positions})")
    if conflicts:
        raise NanoGPTError(f"--model.init_from {spec} fixes the model's shape, and these settings conflict with it: "
                           f"{'; '.join(conflicts)}; drop them (a smaller block_size is fine)")
    return {**fixed, "block_size": block_size}
