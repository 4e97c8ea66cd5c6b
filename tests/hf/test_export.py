"""nanogpt-export: a Hugging Face GPT-2 folder that transformers loads to the same logits and vocabulary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from nanogpt.hf.export import export, main
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizers.char import CharTokenizer
from tests.conftest import assert_user_error, run_main


def write_checkpoint(model: GPT, tokenizer: CharTokenizer, path) -> None:
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}, path)


def hf_logits(folder, idx: torch.Tensor) -> torch.Tensor:
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("options", [dict(), dict(activation="relu", bias=False)], ids=["gpt2", "relu_no_bias"])
def test_transformers_gives_the_same_logits(tmp_path, shakespeare_text, options):
    tok = CharTokenizer.from_text(shakespeare_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.1,
                          **options))
    with torch.no_grad():  # move LayerNorms and biases off their init values, so a wrong mapping shows
        for name, p in model.named_parameters():
            if ".ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    write_checkpoint(model, tok, tmp_path / "m.ckpt")
    out = export(str(tmp_path / "m.ckpt"), str(tmp_path / "hf"))
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "vocab.json", "tokenizer.json",
                                               "tokenizer_config.json"}
    idx = torch.as_tensor(tok.encode(shakespeare_text[:64])).view(2, 32)
    ours, _ = model.eval()(idx)
    assert (hf_logits(out, idx) - ours).abs().max().item() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == options.get("activation", "gelu")
    assert config["n_positions"] == 32 and config["vocab_size"] == tok.vocab_size


def test_checkpoint_and_tokenizer_round_trip(random_checkpoint, shakespeare_text, tmp_path):
    out = export(str(random_checkpoint), str(tmp_path / "hf"))
    model, tok = load_checkpoint(str(random_checkpoint))
    text = shakespeare_text[5000:5032]
    ids = torch.as_tensor(tok.encode(text))[None]
    assert (hf_logits(out, ids) - model(ids)[0]).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text)["input_ids"] == tok.encode(text).tolist()
    assert hf_tok.decode(tok.encode(text).tolist()) == text
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == {c: i for i, c in enumerate(tok.chars)}


def test_greedy_generation_agrees_with_transformers(random_checkpoint, tmp_path):
    out = export(str(random_checkpoint), str(tmp_path / "hf"))
    model, tok = load_checkpoint(str(random_checkpoint))
    idx = torch.as_tensor(tok.encode("ROMEO:"))[None]
    ours = model.generate(idx, 20, temperature=0)  # stays within block_size 32: both see the whole text
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    theirs = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def nanogpt_export(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).parent / "nanogpt-export"
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_writes_the_folder_and_refuses_to_clobber(random_checkpoint, shakespeare_text, tmp_path, capsys):
    result = nanogpt_export("--ckpt", random_checkpoint, "--out", tmp_path / "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    tok = CharTokenizer.from_text(shakespeare_text)
    torch.manual_seed(1)  # another model of the same shape: its export must replace the first one's
    other = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    write_checkpoint(other, tok, tmp_path / "other.ckpt")
    again = run_main(main, capsys, "--ckpt", tmp_path / "other.ckpt", "--out", tmp_path / "hf")
    assert_user_error(again, "already holds files", "--overwrite")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    replaced = run_main(main, capsys, "--ckpt", tmp_path / "other.ckpt", "--out", tmp_path / "hf", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    idx = torch.as_tensor(tok.encode(shakespeare_text[:32]))[None]
    assert (hf_logits(tmp_path / "hf", idx) - other.eval()(idx)[0]).abs().max().item() < 1e-4  # the new model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no temporary folder left behind


def test_the_tied_lm_head_is_stored_once(random_checkpoint, tmp_path):
    from safetensors import safe_open

    out = export(str(random_checkpoint), str(tmp_path / "hf"))
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        tensors = {name: f.get_tensor(name) for name in names}
    assert "transformer.wte.weight" in names and not any(name.startswith("lm_head") for name in names)
    # the file holds each tensor once: its size is the tensors' bytes plus a header
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload < (out / "model.safetensors").stat().st_size < payload + 64 * 1024
    model, _ = load_checkpoint(str(random_checkpoint))
    assert torch.equal(tensors["transformer.wte.weight"], model.lm_head.weight)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied again on load


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "nope.ckpt", "--out", tmp_path / "hf"), "does not exist")
    (tmp_path / "file").write_text("x")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "nope.ckpt", "--out", tmp_path / "file"), "is a file")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow  # needs a real training run
def test_a_trained_run_exports_exactly(trained_run, shakespeare_text, tmp_path):
    out = export(str(trained_run), str(tmp_path / "hf"))
    model, tok = load_checkpoint(str(trained_run))
    idx = torch.as_tensor(tok.encode(shakespeare_text[:4 * model.config.block_size])).view(4, -1)
    assert (hf_logits(out, idx) - model(idx)[0]).abs().max().item() < 1e-4
