"""Training on subword tokens through the real train.py: the token cache, val/bpb, exact resume, reuse and
the one-line errors of a tokenizer that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.tokenizers.bpe import SubwordTokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.io import load_checkpoint
from nanogpt.data.token_cache import CorpusConfig, prepare_corpus
from tests.conftest import REPO, assert_user_error, read_scalars
from tests.tokenizers.test_bpe import hub_cache, world_text
from tests.training.test_resume import assert_same_training, load, train

BPE = ["--data.tokenizer", "bpe", "--data.bpe_vocab_size", "512"]


@pytest.fixture(scope="module")
def bpe_straight(tmp_path_factory, nanogpt_cache) -> Path:
    """An uninterrupted 60-step run on a 512-token BPE: the reference for exact resume."""
    run = tmp_path_factory.mktemp("bpe_straight") / "run"
    result = train(run, nanogpt_cache, *BPE)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


# ------------------------------------------------------------------------------------------------ token cache
def test_the_tokenizer_is_part_of_the_cache_key(tmp_path, shakespeare_path):
    cache = str(tmp_path / "cache")
    char = prepare_corpus(CorpusConfig(source=str(shakespeare_path)), cache)
    bpe = prepare_corpus(CorpusConfig(source=str(shakespeare_path), tokenizer="bpe", bpe_vocab_size=512), cache)
    again = prepare_corpus(CorpusConfig(source=str(shakespeare_path), tokenizer="bpe", bpe_vocab_size=512), cache)
    other = prepare_corpus(CorpusConfig(source=str(shakespeare_path), tokenizer="bpe", bpe_vocab_size=600), cache)
    assert not bpe.from_cache and again.from_cache and not other.from_cache
    assert char.tokenizer.kind == "char" and char.train.dtype == np.uint8 and len(char.train) > 1_000_000
    assert bpe.train.dtype == np.uint16 and len(bpe.train) < len(char.train) / 1.8  # ~1.9 bytes per token
    text = shakespeare_path.read_text(encoding="utf-8")
    # encoded in parallel pieces, the cache holds the ids of the whole text
    assert np.array_equal(np.asarray(again.train), again.tokenizer.encode(text))
    assert other.tokenizer.vocab_size == 600 and bpe.tokenizer == again.tokenizer != other.tokenizer
    assert char.path.parent != bpe.path.parent  # a new tokenizer never replaces the other's entry
    assert prepare_corpus(CorpusConfig(source=str(shakespeare_path)), cache).from_cache


def test_a_tokenizer_file_encodes_beyond_uint16(tmp_path):
    """A vocabulary over 65,536 tokens is stored as uint32."""
    words = [f"w{i}" for i in range(66_000)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"] = len(vocab)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    backwards = words[::-1]
    text = "".join(" ".join(backwards[i : i + 100]) + "\n" for i in range(0, len(words), 100))
    (tmp_path / "corpus.txt").write_text(text)
    corpus = prepare_corpus(CorpusConfig(source=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path)),
                            str(tmp_path / "cache"))
    assert corpus.train.dtype == np.uint32 and corpus.train[0] == 65_999 and len(corpus.train) == 66_000


def test_bad_tokenizer_options_are_one_line_errors(tmp_path, shakespeare_path):
    def message(**options) -> str:
        with pytest.raises(NanoGPTError) as e:
            prepare_corpus(CorpusConfig(source=str(shakespeare_path), **options), str(tmp_path / "cache"))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "not char, bpe, hf:NAME" in message(tokenizer="gpt2-typo")
    assert "too small" in message(tokenizer="bpe", bpe_vocab_size=255)
    (tmp_path / "x.json").write_text("[1, 2]")
    assert "is not a Hugging Face tokenizer.json" in message(tokenizer=str(tmp_path / "x.json"))
    (tmp_path / "small.txt").write_text("to be or not to be\n" * 50)
    with pytest.raises(NanoGPTError, match="more merges than the corpus gives"):
        prepare_corpus(CorpusConfig(source=str(tmp_path / "small.txt"), tokenizer="bpe", bpe_vocab_size=5000),
                       str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("corpus/*/*"))  # no entry, not even a half-written one


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_a_bpe_run_logs_bits_per_byte_and_carries_its_tokenizer(bpe_straight, nanogpt_cache, tmp_path):
    scalars = read_scalars(bpe_straight)
    assert [s for s, _ in scalars["val/bpb"]] == [24, 49] and "val/bpc" not in scalars
    ckpt = load(bpe_straight / "checkpoints" / "last.ckpt")
    assert ckpt["tokenizer"]["type"] == "subword" and ckpt["tokenizer"]["source"] == "bpe:512"
    model, tok = load_checkpoint(str(bpe_straight))
    assert tok.vocab_size == model.config.vocab_size == 512
    # bits per byte from the loss: val/loss nats per token over the validation text's bytes per token
    (_, loss), (_, bpb) = scalars["val/loss"][-1], scalars["val/bpb"][-1]
    assert 1.5 < (loss / np.log(2)) / bpb < 3.5  # a 512-token BPE: about 2 bytes per token
    assert b"data/tokenizer" in b"".join(p.read_bytes() for p in bpe_straight.glob("events.out.tfevents.*"))
    char = train(tmp_path / "char", nanogpt_cache, max_steps=30)
    assert char.returncode == 0, char.stderr[-3000:]
    char_scalars = read_scalars(tmp_path / "char")
    # ASCII Shakespeare: a character is a byte, so bits per byte are bits per character
    assert char_scalars["val/bpb"][0][1] == pytest.approx(char_scalars["val/bpc"][0][1], rel=1e-5)


@pytest.mark.slow
def test_a_bpe_run_resumes_bit_exactly(bpe_straight, nanogpt_cache, tmp_path):
    run = tmp_path / "run"
    first = train(run, nanogpt_cache, *BPE, max_steps=35)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(run, nanogpt_cache, *BPE, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_training(bpe_straight, run)


@pytest.mark.slow
def test_another_tokenizer_on_resume_or_reuse_is_one_line(bpe_straight, nanogpt_cache, tmp_path):
    run = tmp_path / "copy"
    first = train(run, nanogpt_cache, *BPE, max_steps=10)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    resumed = train(run, nanogpt_cache, resume=True)  # the default: characters
    assert_user_error(resumed, "checkpoint's tokenizer is bpe:512 (512 tokens)", "data's is char (65 characters)")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    kind = train(tmp_path / "reuse_char", nanogpt_cache, "--data.vocab", bpe_straight, max_steps=5)
    assert_user_error(kind, "holds a subword tokenizer", "--data.tokenizer bpe")
    reused = train(tmp_path / "reuse", nanogpt_cache, "--data.tokenizer", "bpe", "--data.vocab", bpe_straight,
                   max_steps=5)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "reuse"))[1] == load_checkpoint(str(bpe_straight))[1]


@pytest.mark.slow
def test_train_with_an_hf_tokenizer_from_the_local_cache(nanogpt_cache, tmp_path, shakespeare_text, monkeypatch):
    world_bpe = SubwordTokenizer.train([world_text(), shakespeare_text[:200_000]], 400)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, world_bpe, "someone/tiny-gpt2")))  # for train.py
    result = train(tmp_path / "run", nanogpt_cache, "--data.tokenizer", "hf:someone/tiny-gpt2", max_steps=5)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["tokenizer"]["source"] == "hf:someone/tiny-gpt2" and ckpt["hyper_parameters"]["vocab_size"] == 401
    assert json.loads(ckpt["tokenizer"]["json"])["added_tokens"][0]["content"] == "<|endoftext|>"
    assert torch.is_tensor(ckpt["state_dict"]["model.transformer.wte.weight"])
    assert ckpt["state_dict"]["model.transformer.wte.weight"].shape[0] == 448  # padded


@pytest.mark.slow  # four child processes
def test_the_data_benchmark_measures_bpe_encoding(monkeypatch, tmp_path, shakespeare_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import data_speed

    data_speed.main(["--tokenizer", "bpe", "--text", str(shakespeare_path), "--sizes_mb", "2", "--steps", "2",
               "--workdir", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    size = last["sizes_mb"]["2"]
    assert last["tokenizer"] == "bpe" and last["bpe_encode_mb_per_s"] == size["bpe_encode_mb_per_s"] > 0
    assert 2.5 < size["bytes_per_token"] < 3.5 and size["train_steps"] == 2
    assert not list(tmp_path.iterdir())  # corpus and cache deleted
