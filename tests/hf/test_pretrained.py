"""Pretrained GPT-2 folders as our GPT: parity with transformers, hf: from a local cache, export round trips, bad input.

Every folder is built here: a small random transformers.GPT2LMHeadModel saved with save_pretrained (no download).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn import functional as F
from safetensors.torch import load_file, save_file

from nanogpt.errors import NanoGPTError
from nanogpt.hf.export import export
from nanogpt.model import GPT, GPTConfig
from nanogpt.hf.pretrained import load_pretrained, resolve_pretrained
from nanogpt.tokenizers.char import CharTokenizer
from tests.conftest import REPO, assert_user_error, read_scalars, run_main, run_script
from tests.hf.test_export import write_checkpoint

VOCAB, POSITIONS = 300, 64  # a subword vocabulary: our model pads it to 320 rows


def bpe_tokenizer(text: str, vocab_size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) of vocab_size tokens trained on text with the `tokenizers` library."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == vocab_size
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


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
def hf_tokenizer(shakespeare_text) -> transformers.PreTrainedTokenizerFast:
    return bpe_tokenizer(shakespeare_text[:200_000])


@pytest.fixture(scope="module")
def folders(hf_model, hf_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The model as save_pretrained writes it (with its tokenizer), and in the older pytorch_model.bin form."""
    base = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(base / "safetensors")
    hf_tokenizer.save_pretrained(base / "safetensors")
    return {"safetensors": base / "safetensors", "bin": save_bin(hf_model, base / "bin")}


def ids(n_rows: int = 2, length: int = POSITIONS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_rows, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) logits of transformers or of our model (which leaves out its padding)."""
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_same_logits_loss_and_greedy_text_as_transformers(hf_model, hf_tokenizer, folders, kind):
    model = load_pretrained(str(folders[kind]))
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (VOCAB, POSITIONS, 2, 2, 64)
    assert c.activation == "gelu_tanh" and c.bias and not model.training
    assert model.transformer.wte.weight.shape == (320, 64)  # padded to a multiple of 64
    idx = ids()
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max().item() < 1e-4
    with torch.no_grad():  # the loss ignores the padding: the same cross-entropy as transformers'
        ours_loss = model(idx[:, :-1], idx[:, 1:])[1].item()
        theirs_loss = F.cross_entropy(hf_model(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten()).item()
    assert abs(ours_loss - theirs_loss) < 1e-5
    prompt = torch.as_tensor(hf_tokenizer("ROMEO:")["input_ids"])[None]
    ours = model.generate(prompt, 40, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert hf_tokenizer.decode(ours[0]) == hf_tokenizer.decode(theirs[0])
    assert len(set(ours[0, prompt.size(1):].tolist())) > 3  # a varied continuation: the comparison means something


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
    wrong = rf"wrong shape transformer\.wte\.weight \({VOCAB}, 64\) \(expected \({VOCAB + 8}, 64\)\)"
    with pytest.raises(NanoGPTError, match=wrong):
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


# ----------------------------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_fine_tune_resume_sample_and_export(folders, hf_tokenizer, tmp_path, nanogpt_cache):
    """train.py --model.init_from FOLDER: the folder's weights, shape and tokenizer; the loss falls; a resume
    continues from the run's own checkpoint; sampling and export work on the result."""
    from nanogpt.tokenizers.bpe import SubwordTokenizer
    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.data.blocks import sample_rank_batch
    from nanogpt.generate import sample
    from nanogpt.io import load_checkpoint

    run = tmp_path / "run"
    env = {"NANOGPT_CACHE": str(nanogpt_cache)}
    common = ["--model.init_from", folders["safetensors"], "--data.source", "tinyshakespeare",
              "--data.batch_size", 8, "--data.val_blocks", 16, "--model.block_size", 32, "--model.dropout", 0.0,
              "--model.learning_rate", 3e-3, "--model.min_lr", 3e-3, "--model.warmup_steps", 0,
              "--trainer.val_check_interval", 3, "--trainer.log_every_n_steps", 1, "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", run]
    first = run_script("train.py", *common, "--trainer.max_steps", 6, cwd=tmp_path, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # the run took the folder's shape and tokenizer, and started from its weights: the first batch's loss is the
    # pretrained model's loss on that batch
    model, tokenizer = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 64, VOCAB)
    assert model.config.activation == "gelu_tanh" and model.config.block_size == 32
    assert isinstance(tokenizer, SubwordTokenizer) and tokenizer.encode("ROMEO: hi").tolist() == hf_tokenizer(
        "ROMEO: hi")["input_ids"]
    dm = TextDataModule(source="tinyshakespeare", tokenizer=str(folders["safetensors"]), block_size=32, batch_size=8)
    x, y = sample_rank_batch(dm.train_tokens, 32, 8, 1337, 0, 0)
    with torch.no_grad():
        start_loss = load_pretrained(str(folders["safetensors"]), block_size=32)(x, y)[1].item()
    scalars = read_scalars(run)
    train = dict(scalars["train/loss"])
    assert abs(train[0] - start_loss) < 1e-4
    assert train[5] < train[0] - 0.5 and scalars["val/loss"][-1][1] < scalars["val/loss"][0][1]
    # resume to step 9: from the run's own checkpoint (a reload of the folder would start near train[0] again)
    second = run_script("train.py", *common, "--trainer.max_steps", 9, "--ckpt_path", "last", cwd=tmp_path, env=env,
                        timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    train = dict(read_scalars(run)["train/loss"])
    assert sorted(train) == list(range(9)) and train[6] < train[0] - 0.5
    # sampling decodes GPT-2-style tokens; the export loads back as the same model
    model, tokenizer = load_checkpoint(str(run))
    text = sample(model, tokenizer, "ROMEO:", max_new_tokens=20, temperature=0)[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    folder = export(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    model, _ = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    idx = ids(length=32)
    assert (logits_of(load_pretrained(str(folder)), idx) - logits_of(model, idx)).abs().max().item() < 1e-5


def test_init_from_conflicts_and_bad_folders_are_one_error_line(folders, tmp_path, capsys, monkeypatch):
    from nanogpt.training.cli import main

    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns about arguments beside pytest's
    base = ["--model.init_from", folders["safetensors"], "--trainer.default_root_dir", tmp_path / "run",
            "--trainer.max_steps", 1]
    result = run_main(main, capsys, *base, "--model.n_layer", 4, "--model.n_embd", 128, "--model.block_size", 128)
    assert_user_error(result, "conflict", "model.n_layer=4 (the model has 2)", "model.n_embd=128 (the model has 64)",
                      "model.block_size=128 (at most its n_positions, 64)")
    result = run_main(main, capsys, *base, "--data.tokenizer", "bpe")
    assert_user_error(result, "brings its own tokenizer")
    llama = edited_copy(folders["safetensors"], tmp_path / "llama", config={"model_type": "llama"})
    result = run_main(main, capsys, "--model.init_from", llama, "--trainer.default_root_dir", tmp_path / "run2")
    assert_user_error(result, "supported model types: gpt2")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run2" / "checkpoints").exists()


@pytest.mark.slow
def test_the_finetune_config_starts_on_a_cpu(folders, tmp_path, nanogpt_cache):
    """configs/finetune_shakespeare.yaml, with the small folder in place of hf:gpt2 (no download in tests)."""
    run = tmp_path / "run"
    result = run_script("train.py", "--config", REPO / "configs" / "finetune_shakespeare.yaml",
                        "--model.init_from", folders["safetensors"], "--model.block_size", 32, "--data.batch_size", 2,
                        "--data.val_blocks", 4, "--trainer.max_steps", 2, "--trainer.val_check_interval", 2,
                        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", run, cwd=tmp_path,
                        env={"NANOGPT_CACHE": str(nanogpt_cache)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["init_from"] == str(folders["safetensors"]) and hparams["learning_rate"] == 3e-5
    assert "val/loss" in read_scalars(run)


@pytest.mark.slow
@pytest.mark.ddp
def test_fine_tune_on_two_processes_starts_from_the_folder(folders, tmp_path, nanogpt_cache):
    """Under DDP (2 CPU processes over gloo) every rank starts from the folder's weights: the first global batch's
    loss is the pretrained model's."""
    from nanogpt.data.datamodule import TextDataModule
    from nanogpt.data.blocks import sample_rank_batch

    run = tmp_path / "run"
    result = run_script("train.py", "--model.init_from", folders["safetensors"], "--data.source", "tinyshakespeare",
                        "--data.batch_size", 8, "--data.val_blocks", 4, "--model.block_size", 32,
                        "--model.dropout", 0.0, "--trainer.max_steps", 2, "--trainer.val_check_interval", 2,
                        "--trainer.log_every_n_steps", 1, "--trainer.accelerator", "cpu", "--trainer.devices", 2,
                        "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
                        "--trainer.default_root_dir", run, cwd=tmp_path, env={"NANOGPT_CACHE": str(nanogpt_cache)},
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    dm = TextDataModule(source="tinyshakespeare", tokenizer=str(folders["safetensors"]), block_size=32, batch_size=8)
    x, y = sample_rank_batch(dm.train_tokens, 32, 8, 1337, 0, 0)  # the global batch of step 0, both ranks' rows
    with torch.no_grad():
        start_loss = load_pretrained(str(folders["safetensors"]), block_size=32)(x, y)[1].item()
    assert abs(dict(read_scalars(run)["train/loss"])[0] - start_loss) < 1e-4
