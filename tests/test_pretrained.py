"""Pretrained GPT-2 folders as our GPT: parity with transformers, hf: from a local cache, export round trips, bad input.

Every folder is built here: a small random transformers.GPT2LMHeadModel saved with save_pretrained (no download).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanogpt.errors import NanoGPTError
from nanogpt.export import export
from nanogpt.model import GPT, GPTConfig
from nanogpt.pretrained import load_pretrained, resolve_pretrained
from nanogpt.tokenizer import CharTokenizer
from tests.test_export import write_checkpoint

VOCAB, POSITIONS = 200, 64


def random_gpt2(seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 whose every parameter (biases and LayerNorms too) is moved off its init value."""
    torch.manual_seed(seed)
    settings = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=None,
                    eos_token_id=None)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config})).eval()
    with torch.no_grad():  # large enough that greedy text varies, so a wrong mapping shows
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def save_bin(model: transformers.GPT2LMHeadModel, folder: Path) -> Path:
    """The older format: config.json and a pickled state dict, pytorch_model.bin (transformers 5 writes only
    safetensors), under GPT2Model's names without the `transformer.` prefix, as the hub's gpt2 has them."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    return random_gpt2()


@pytest.fixture(scope="module")
def folders(hf_model, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(base / "safetensors")
    return {"safetensors": base / "safetensors", "bin": save_bin(hf_model, base / "bin")}


def ids(n_rows: int = 2, length: int = POSITIONS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_rows, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_same_logits_and_greedy_tokens_as_transformers(hf_model, folders, kind):
    model = load_pretrained(str(folders[kind]))
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (VOCAB, POSITIONS, 2, 2, 64)
    assert c.activation == "gelu_tanh" and c.bias and not model.training
    idx = ids()
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max().item() < 1e-4
    prompt = idx[:1, :5]
    ours = model.generate(prompt, 40, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 5:].tolist())) > 3  # a varied continuation: the comparison means something


def test_a_smaller_block_size_crops_the_position_table(hf_model, folders):
    model = load_pretrained(str(folders["safetensors"]), block_size=16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 64)
    idx = ids(length=16)
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max().item() < 1e-4


def write_hub_cache(cache: Path, repo: str, folder: Path, revision: str = "0" * 40) -> None:
    """The Hugging Face hub cache layout for repo: models--ORG--NAME/snapshots/REV/<files> and refs/main."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / revision)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)


def test_hf_name_loads_from_the_local_cache_offline(hf_model, folders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    write_hub_cache(cache, "tiny/gpt2-test", folders["safetensors"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import otherwise
    assert resolve_pretrained("hf:tiny/gpt2-test") == cache / "models--tiny--gpt2-test" / "snapshots" / ("0" * 40)
    idx = ids()
    model = load_pretrained("hf:tiny/gpt2-test")
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max().item() < 1e-4
    with pytest.raises(NanoGPTError, match=r"hf:not/cached is not in the Hugging Face cache .* network once"):
        load_pretrained("hf:not/cached")


@pytest.mark.parametrize("options", [dict(), dict(activation="gelu_tanh"), dict(activation="relu", bias=False)],
                         ids=["gelu", "gelu_tanh", "relu_no_bias"])
def test_export_then_load_is_the_identity(shakespeare_text, tmp_path, options):
    tok = CharTokenizer.from_text(shakespeare_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0,
                          **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    write_checkpoint(model, tok, tmp_path / "m.ckpt")
    folder = export(str(tmp_path / "m.ckpt"), str(tmp_path / "hf"))
    loaded = load_pretrained(str(folder))
    assert loaded.config == GPTConfig(**{**model.config.to_dict(), "dropout": 0.0})  # bias=False comes back too
    idx = torch.as_tensor(tok.encode(shakespeare_text[:64])).view(2, 32)
    assert torch.equal(logits_of(loaded, idx), logits_of(model, idx))
    # and transformers computes the same with the exported activation (gelu_tanh is GPT-2's gelu_new)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert (logits_of(hf, idx) - logits_of(model, idx)).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------- bad input


def edited_copy(folder: Path, dest: Path, config=None, weights=None) -> Path:
    """A copy of a safetensors folder with config.json fields changed and/or its tensors edited."""
    shutil.copytree(folder, dest)
    if config:
        data = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**data, **config}))
    if weights:
        state = weights(load_file(dest / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()}, dest / "model.safetensors")
    return dest


def test_a_folder_of_another_model_type_names_the_supported_ones(folders, tmp_path):
    bad = edited_copy(folders["safetensors"], tmp_path / "llama", config={"model_type": "llama"})
    with pytest.raises(NanoGPTError, match=r"describes a 'llama' model; supported model types: gpt2"):
        load_pretrained(str(bad))


def test_missing_and_mismatched_weights_are_named(folders, tmp_path):
    def drop(state):
        del state["transformer.h.1.mlp.c_fc.weight"]
        return state

    missing = edited_copy(folders["safetensors"], tmp_path / "missing", weights=drop)
    with pytest.raises(NanoGPTError, match=r"missing transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_pretrained(str(missing))
    wide = edited_copy(folders["safetensors"], tmp_path / "wide", config={"vocab_size": VOCAB + 8})
    with pytest.raises(NanoGPTError, match=r"wrong shape transformer\.wte\.weight \(200, 64\) \(expected \(208, 64\)\)"):
        load_pretrained(str(wide))

    def untie(state):
        state["lm_head.weight"] = state["transformer.wte.weight"] + 1
        return state

    untied = edited_copy(folders["safetensors"], tmp_path / "untied", weights=untie)
    with pytest.raises(NanoGPTError, match=r"lm_head\.weight differs from the token embedding"):
        load_pretrained(str(untied))


def test_a_block_size_above_n_positions_is_refused(folders):
    with pytest.raises(NanoGPTError, match=r"block_size 65 is above the pretrained model's n_positions \(64"):
        load_pretrained(str(folders["safetensors"]), block_size=65)


def test_options_this_gpt_does_not_compute_are_refused(folders, tmp_path):
    swish = edited_copy(folders["safetensors"], tmp_path / "swish", config={"activation_function": "swish"})
    with pytest.raises(NanoGPTError, match=r"activation_function 'swish' is not supported; supported: gelu_new"):
        load_pretrained(str(swish))
    eps = edited_copy(folders["safetensors"], tmp_path / "eps", config={"layer_norm_epsilon": 1e-6, "n_inner": 100})
    with pytest.raises(NanoGPTError, match=r"sets layer_norm_epsilon=1e-06, n_inner=100"):
        load_pretrained(str(eps))


def test_missing_folder_files_and_unsafe_pickles(folders, tmp_path):
    with pytest.raises(NanoGPTError, match=r"folder .*nowhere does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NanoGPTError, match=r"holds no config\.json"):
        load_pretrained(str(empty))
    shutil.copy(folders["bin"] / "config.json", empty / "config.json")
    with pytest.raises(NanoGPTError, match=r"holds no weights; expected one of model\.safetensors"):
        load_pretrained(str(empty))
    torch.save({"weights": Path("x")}, empty / "pytorch_model.bin")  # a pickle that names a class: never run
    with pytest.raises(NanoGPTError, match=r"refusing to load .*pytorch_model\.bin"):
        load_pretrained(str(empty))
