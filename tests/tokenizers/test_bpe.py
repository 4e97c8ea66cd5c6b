"""Subword tokenizers with the real `tokenizers` library, offline: training, files, hf:, the padded model,
sampling with multi-byte characters split across tokens, and export parity in transformers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from nanogpt.tokenizers.bpe import DEFAULT_BPE_VOCAB_SIZE, SubwordTokenizer, encoding_pieces
from nanogpt.errors import NanoGPTError
from nanogpt.hf.export import export
from nanogpt.generate import sample, stream
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizers.char import CharTokenizer, byte_length, tokenizer_from_dict
from tests.conftest import REPO, run_main
from tests.hf.test_export import hf_logits, write_checkpoint

# accents, CJK, emoji with zero-width-joiner sequences and flags: characters of 2, 3 and 4 UTF-8 bytes
WORLD = (
    "Crème brûlée, naïve façade, Ærøskøbing. 東京で寿司を食べました。中文字符测试。"
    "Family: 👩‍👩‍👧‍👦, couple: 👩‍❤️‍👨, flags 🇫🇷🇯🇵, thumbs 👍🏽 done.\n"
)


def world_text(n: int = 60) -> str:
    """Varied lines of multi-byte text, so the BPE learns merges inside multi-byte characters."""
    return "".join(f"{i}: {WORLD}" if i % 2 else WORLD[::-1] + "\n" for i in range(n))


@pytest.fixture(scope="module")
def shakespeare_bpe(shakespeare_text) -> SubwordTokenizer:
    chunks = (shakespeare_text[i : i + 65536] for i in range(0, len(shakespeare_text), 65536))
    return SubwordTokenizer.train(chunks)


@pytest.fixture(scope="module")
def world_bpe() -> SubwordTokenizer:
    return SubwordTokenizer.train([world_text()], 400)


def gpt2_folder(tokenizer: SubwordTokenizer, path) -> None:
    """A GPT-2-format tokenizer folder, as transformers' save_pretrained writes GPT-2's own."""
    fast = transformers.GPT2TokenizerFast(tokenizer_object=tokenizer.tokenizer, bos_token="<|endoftext|>",
                                          eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(path)


# ------------------------------------------------------------------------------------------------- training
def test_shakespeare_bpe_round_trips_and_compresses(shakespeare_bpe, shakespeare_text):
    tok = shakespeare_bpe
    assert tok.vocab_size == DEFAULT_BPE_VOCAB_SIZE and tok.byte_level and tok.source == "bpe:2048"
    ids = tok.encode(shakespeare_text)
    assert tok.decode(ids) == shakespeare_text
    assert 2.5 < byte_length(shakespeare_text) / len(ids) < 4  # ~2.9 bytes per token; characters give 1.0
    # bits per byte needs each token's bytes: they add up to the text's UTF-8 length
    assert tok.token_bytes()[ids].sum() == byte_length(shakespeare_text)
    # encoding pieces cut at safe newlines, in parallel, gives the ids of the whole text
    chunks = [shakespeare_text[i : i + 7777] for i in range(0, len(shakespeare_text), 7777)]
    pieces = list(encoding_pieces(chunks, 20_000))
    assert "".join(pieces) == shakespeare_text and len(pieces) > 50 and max(map(len, pieces)) <= 20_000
    assert np.array_equal(tok.encode_batch(pieces, np.uint16), ids)
    assert tok.encode_batch(pieces, np.uint16).dtype == np.uint16


def test_the_pipelined_encoding_gives_the_ids_of_the_whole_text_in_order(shakespeare_bpe, shakespeare_text,
                                                                      monkeypatch):
    """subword_batches encodes one batch in a worker thread while the last is converted: order and ids hold."""
    import nanogpt.tokenizers.bpe as bpe

    monkeypatch.setattr(bpe, "ENCODE_BATCH_CHARS", 50_000)  # one 64K piece a batch: 18 batches
    chunks = iter([shakespeare_text[i : i + 7777] for i in range(0, len(shakespeare_text), 7777)])
    batches = list(bpe.subword_batches(chunks, shakespeare_bpe, np.uint16))
    assert len(batches) > 10 and all(b.dtype == np.uint16 for b in batches)
    assert np.array_equal(np.concatenate(batches), shakespeare_bpe.encode(shakespeare_text))

    def failing_chunks():
        yield shakespeare_text[:100_000]
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away"):  # a failure while reading ends the pipeline, not a hang
        list(bpe.subword_batches(failing_chunks(), shakespeare_bpe, np.uint16))


def _both_ways(tokenizer, text, monkeypatch) -> tuple:
    """subword_batches' ids of text with the fast encoder and with `tokenizers` alone."""
    import nanogpt.tokenizers.bpe as bpe

    monkeypatch.setattr(bpe, "ENCODE_BATCH_CHARS", 50_000)
    chunks = [text[i : i + 7777] for i in range(0, len(text), 7777)]
    fast = np.concatenate(list(bpe.subword_batches(iter(chunks), tokenizer, np.uint16)))
    monkeypatch.setattr(tokenizer, "_fast", None)  # the encoder the tokenizer keeps: none, so `tokenizers` alone
    slow = np.concatenate(list(bpe.subword_batches(iter(chunks), tokenizer, np.uint16)))
    monkeypatch.undo()
    return fast, slow


def test_tiktoken_encodes_a_trained_bpe_to_the_same_ids(shakespeare_bpe, world_bpe, shakespeare_text, monkeypatch):
    assert shakespeare_bpe.fast_encoder() is not None and world_bpe.fast_encoder() is not None
    fast, slow = _both_ways(shakespeare_bpe, shakespeare_text, monkeypatch)
    assert np.array_equal(fast, slow) and np.array_equal(fast, shakespeare_bpe.encode(shakespeare_text))
    # accents, CJK, emoji: merges inside multi-byte characters, and characters the BPE never saw
    text = world_text(400) + "Ünïcödé ∑ 𝔘𝔫𝔦 ☃ 🧪 never seen\r\n\t tabs  and   spaces\n\n\n"
    fast, slow = _both_ways(world_bpe, text, monkeypatch)
    assert np.array_equal(fast, slow) and world_bpe.decode(fast) == text


def test_tiktoken_stands_in_for_a_gpt2_folder_and_leaves_added_tokens_to_tokenizers(world_bpe, tmp_path,
                                                                                   monkeypatch):
    gpt2_folder(world_bpe, tmp_path / "gpt2tok")
    tok = SubwordTokenizer.from_path(str(tmp_path / "gpt2tok"))
    assert tok.fast_encoder() is not None and tok.fast_encoder().added == ("<|endoftext|>",)
    text = world_text(100) + "<|endoftext|>" + world_text(100)
    fast, slow = _both_ways(tok, text, monkeypatch)
    assert np.array_equal(fast, slow)  # the batch holding <|endoftext|> went to `tokenizers`: its own id
    assert tok.tokenizer.token_to_id("<|endoftext|>") in fast.tolist()


def test_tiktoken_stands_in_when_the_model_vocabulary_also_holds_the_special_token(world_bpe, monkeypatch):
    """GPT-2's tokenizer.json has <|endoftext|> in the BPE's vocabulary as well as among the added tokens."""
    spec = json.loads(world_bpe.tokenizer.to_str())
    n = len(spec["model"]["vocab"])
    spec["model"]["vocab"]["<|endoftext|>"] = n
    spec["added_tokens"] = [{"id": n, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": True}]
    tok = SubwordTokenizer.from_json(json.dumps(spec), "gpt2-shaped")
    assert tok.fast_encoder() is not None
    fast, slow = _both_ways(tok, world_text(200) + "<|endoftext|>" + world_text(10), monkeypatch)
    assert np.array_equal(fast, slow) and n in fast.tolist()


def test_other_tokenizers_are_encoded_by_tokenizers_alone(world_bpe, tmp_path, monkeypatch):
    import tokenizers as tk

    spec = json.loads(world_bpe.tokenizer.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # not GPT-2's split: tiktoken cannot stand in
    other = SubwordTokenizer.from_json(json.dumps(spec), "test")
    assert other.fast_encoder() is None
    wordpiece = tk.Tokenizer(tk.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    assert SubwordTokenizer(wordpiece, "test").fast_encoder() is None
    fast, slow = _both_ways(other, world_text(50), monkeypatch)
    assert np.array_equal(fast, slow)


def test_a_corpus_where_tiktoken_disagrees_is_encoded_by_tokenizers(shakespeare_bpe, shakespeare_text, monkeypatch):
    """The first batch is checked both ways; a difference (not seen on any real tokenizer: forced here) falls back."""
    import nanogpt.tokenizers.bpe as bpe

    fast = shakespeare_bpe.fast_encoder()
    monkeypatch.setattr(fast, "encode_batch", lambda texts, dtype=np.int64: np.zeros(3, dtype=dtype))
    with pytest.warns(UserWarning, match="tiktoken's ids differ"):
        ids = np.concatenate(list(bpe.subword_batches(iter([shakespeare_text]), shakespeare_bpe, np.uint16)))
    assert np.array_equal(ids, shakespeare_bpe.encode(shakespeare_text))


def test_multibyte_text_round_trips_including_unseen_characters(world_bpe):
    tok = world_bpe
    text = world_text(7) + "Unseen: नमस्ते 🦜 Ω\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.unknown_chars(text) == {}
    assert tok.token_bytes()[ids].sum() == byte_length(text)
    merged = [i for i in range(256, tok.vocab_size) if len(tok.decode([i]).encode("utf-8", "replace")) > 1]
    assert merged  # merges inside multi-byte characters were learned
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))) == tok  # plain data, e.g. in a checkpoint


def test_stream_decoder_never_yields_half_a_character(world_bpe):
    text = world_text(3)
    ids = world_bpe.encode(text).tolist()
    # some token ends inside a character: decoding it alone gives a replacement character
    assert any("\ufffd" in world_bpe.decode([i]) for i in ids)
    decoder = world_bpe.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # tokens that only begin a character show nothing yet


# ---------------------------------------------------------------------------------------- files and hf:NAME
def test_gpt2_format_folder_and_file_load_as_the_same_tokenizer(world_bpe, tmp_path):
    gpt2_folder(world_bpe, tmp_path / "gpt2tok")
    from_folder = SubwordTokenizer.from_path(str(tmp_path / "gpt2tok"))
    from_file = SubwordTokenizer.from_path(str(tmp_path / "gpt2tok" / "tokenizer.json"))
    assert from_folder == from_file and from_folder.vocab_size == world_bpe.vocab_size + 1  # + <|endoftext|>
    text = world_text(4)
    assert from_folder.encode(text).tolist() == world_bpe.encode(text).tolist()
    # <|endoftext|> typed in the text is GPT-2's special token, counted as its own 13 bytes
    eot = from_folder.encode("a<|endoftext|>b")
    assert world_bpe.vocab_size in eot.tolist() and from_folder.decode(eot) == "a<|endoftext|>b"
    assert from_folder.token_bytes()[eot].sum() == len("a<|endoftext|>b")


def hub_cache(tmp_path, world_bpe, name: str):
    """A Hugging Face hub cache holding model `name`'s GPT-2-format tokenizer folder, as a download leaves it."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + name.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    gpt2_folder(world_bpe, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return cache


def run_python(code: str, cache, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_hf_name_loads_offline_from_the_local_cache(world_bpe, tmp_path):
    cache = hub_cache(tmp_path, world_bpe, "someone/tiny-gpt2")
    text = world_text(2)
    code = (
        "import json, sys\n"
        "from nanogpt.tokenizers.bpe import SubwordTokenizer\n"
        "from nanogpt.errors import NanoGPTError\n"
        "tok = SubwordTokenizer.from_hub('someone/tiny-gpt2')\n"
        f"print(json.dumps([tok.source, tok.encode({text!r}).tolist()]))\n"
        "try:\n"
        "    SubwordTokenizer.from_hub('someone/not-cached')\n"
        "except NanoGPTError as e:\n"
        "    print('error: ' + str(e))\n"
    )
    result = run_python(code, cache, tmp_path)
    assert result.returncode == 0, result.stderr
    source, ids = json.loads(result.stdout.splitlines()[0])
    assert source == "hf:someone/tiny-gpt2" and ids == world_bpe.encode(text).tolist()
    error = result.stdout.splitlines()[1]
    assert "'someone/not-cached'" in error and "local Hugging Face cache" in error


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_tokenizer_inputs_are_one_line_errors(tmp_path, shakespeare_text):
    def message(call) -> str:
        with pytest.raises(NanoGPTError) as e:
            call()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "not char, bpe, hf:NAME" in message(lambda: SubwordTokenizer.from_path("gpt3"))
    assert "not char, bpe, hf:NAME" in message(lambda: SubwordTokenizer.from_path(str(tmp_path / "nope.json")))
    (tmp_path / "empty").mkdir()
    assert "without a tokenizer.json" in message(lambda: SubwordTokenizer.from_path(str(tmp_path / "empty")))
    (tmp_path / "bad.json").write_text('{"vocab": {"a": 0}}')
    assert "is not a Hugging Face tokenizer.json" in message(lambda: SubwordTokenizer.from_path(str(tmp_path / "bad.json")))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00junk")
    assert "tokenizer.json" in message(lambda: SubwordTokenizer.from_path(str(tmp_path / "binary.json")))
    assert "needs a model name" in message(lambda: SubwordTokenizer.from_hub(""))
    small = message(lambda: SubwordTokenizer.train([shakespeare_text[:10_000]], 200))
    assert "--data.bpe_vocab_size 200 is too small" in small and "at least 256" in small
    too_many = message(lambda: SubwordTokenizer.train(["to be or not to be\n" * 20], 1000))
    assert "more merges than the corpus gives" in too_many and "pick at most" in too_many
    with pytest.raises(NanoGPTError):
        tokenizer_from_dict({"type": "subword", "json": "not json"})


# ------------------------------------------------------------------------------------ padded model, sampling
def test_subword_vocabularies_are_padded_and_padding_is_never_sampled():
    assert GPTConfig(vocab_size=65).padded_vocab_size == 65  # characters: unpadded, as before
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304  # nanoGPT's GPT-2 figure
    assert GPTConfig(vocab_size=2048).padded_vocab_size == 2048
    config = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).eval()
    assert model.transformer.wte.weight.shape == (320, 32)
    # MFU counts the padded head: the (padded, C) matrix is in the parameter count
    assert model.num_params(non_embedding=True) - GPT(GPTConfig(**{**config.to_dict(), "vocab_size": 256})).num_params(
        non_embedding=True) == (320 - 256) * 32
    with torch.no_grad():  # the final hidden state is all ones for any input, so padding rows of ones win
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[300:] = 1.0
    ones = torch.ones(32)
    assert (model.lm_head.weight[300:] @ ones).min() > (model.lm_head.weight[:300] @ ones).max()  # padding would win
    x = torch.zeros(2, 4, dtype=torch.long)
    logits, loss = model(x, x)
    assert logits.shape == (2, 4, 300)  # the padding's logits are dropped: never sampled, never in the loss
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 300), x.reshape(-1)))
    assert loss < 10  # about ln(300) = 5.7; with the padding's logits of 32 in the softmax it would be about 35
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 30, temperature=2.0, top_k=None)
    assert out.max() < 300
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0).max() < 300


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, world_bpe):
    """A tiny GPT over world_bpe (padded 400 -> 448), briefly trained on world_text so that it writes emoji and
    CJK made of several tokens, saved in train.py's checkpoint format."""
    config = GPTConfig(vocab_size=world_bpe.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config)
    data = torch.as_tensor(world_bpe.encode(world_text()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        starts = torch.randint(len(data) - 65, (16,))
        batch = torch.stack([data[s : s + 65] for s in starts])  # (16, 65)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("bpe_ckpt") / "bpe.ckpt"
    write_checkpoint(model, world_bpe, path)
    return path


def test_checkpoint_carries_the_tokenizer(bpe_checkpoint, world_bpe):
    model, tok = load_checkpoint(str(bpe_checkpoint))
    assert tok == world_bpe and model.transformer.wte.weight.shape[0] == 448


def test_streaming_and_sampling_with_characters_split_across_tokens(bpe_checkpoint):
    model, tok = load_checkpoint(str(bpe_checkpoint))
    prompt = "Family: 👩"
    kw = dict(max_new_tokens=150, temperature=1.0, top_k=None, seed=3)
    pieces = [p[0] for p in stream(model, tok, prompt, **kw)]
    streamed = "".join(pieces)
    # the same tokens, straight from the model: the stream is their text, less a character left incomplete
    g = torch.Generator().manual_seed(3)
    idx = torch.as_tensor(tok.encode(prompt))[None]
    ids = model.generate(idx, 150, temperature=1.0, generator=g)[0, idx.size(1) :].tolist()
    full = tok.decode(ids)
    assert full.startswith(streamed) and set(full[len(streamed) :]) <= {"\ufffd"}
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert split and sum(1 for c in streamed if ord(c) > 0xFFFF) >= 3  # 4-byte characters made of several tokens
    # a replacement character only where the model's bytes are truly invalid, as a whole decode shows them
    assert streamed.count("\ufffd") == full[: len(streamed)].count("\ufffd")
    cached = sample(model, tok, prompt, **kw)
    assert cached == [prompt + streamed] == sample(model, tok, prompt, use_cache=False, **kw)


def test_stop_string_spanning_tokens_is_found(bpe_checkpoint):
    model, tok = load_checkpoint(str(bpe_checkpoint))
    kw = dict(max_new_tokens=80, temperature=1.0, top_k=None, seed=7)
    g = torch.Generator().manual_seed(7)
    idx = torch.as_tensor(tok.encode("1: "))[None]
    ids = model.generate(idx, 80, temperature=1.0, generator=g)[0, idx.size(1) :].tolist()
    new = tok.decode(ids)

    def stop_inside(k: int):
        """A stop string from inside token k to inside token k + 1, if both are whole characters; else None."""
        head, this, after = tok.decode(ids[:k]), tok.decode([ids[k]]), tok.decode([ids[k + 1]])
        if "\ufffd" in this + after or len(this) < 2 or not after or not new.startswith(head + this + after):
            return None
        start = len(head) + 1
        stop = new[start : len(head) + len(this) + 1]
        return (start, stop) if new.find(stop) == start else None

    start, stop = next(found for k in range(len(ids) - 1) if (found := stop_inside(k)))
    pieces = [p[0] for p in stream(model, tok, "1: ", stop=stop, **kw)]
    assert "".join(pieces) == new[:start]
    assert sample(model, tok, "1: ", stop=stop, **kw) == ["1: " + new[:start]]


def test_sample_cli_and_demo_with_a_subword_model(bpe_checkpoint, capsys):
    from nanogpt.app import generate_text
    from nanogpt.generate import main

    model, tok = load_checkpoint(str(bpe_checkpoint))
    common = ["--ckpt", bpe_checkpoint, "--prompt", "Family: ", "--max_new_tokens", "60", "--seed", "5"]
    streamed = run_main(main, capsys, *common, "--stream")
    plain = run_main(main, capsys, *common)
    uncached = run_main(main, capsys, *common, "--no_cache")
    assert streamed.returncode == plain.returncode == uncached.returncode == 0
    (expected,) = sample(model, tok, "Family: ", max_new_tokens=60, seed=5)
    assert streamed.stdout == plain.stdout == uncached.stdout == expected + "\n"
    assert any(ord(c) > 0xFFFF for c in expected)  # the model wrote 4-byte characters
    stop = expected[len("Family: ") + 3 : len("Family: ") + 6]
    stopped = run_main(main, capsys, *common, "--stream", "--stop", stop)
    assert stopped.stdout == expected[: expected.index(stop, len("Family: "))] + "\n"
    texts = list(generate_text(model, tok, "Family: ", 60, 0.8, 200, 1.0, 5, max_length=1000))
    assert texts[-1] == sample(model, tok, "Family: ", max_new_tokens=60, top_k=200, top_p=1.0, seed=5)[0]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


# ----------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("gpt2_format", [False, True], ids=["trained_bpe", "gpt2_folder"])
def test_export_with_subword_tokenizer_matches_transformers(tmp_path, world_bpe, gpt2_format):
    tok = world_bpe
    if gpt2_format:
        gpt2_folder(world_bpe, tmp_path / "tok")
        tok = SubwordTokenizer.from_path(str(tmp_path / "tok"))
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).eval()
    assert config.padded_vocab_size == 448
    write_checkpoint(model, tok, tmp_path / "m.ckpt")
    out = export(str(tmp_path / "m.ckpt"), str(tmp_path / "hf"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == tok.vocab_size  # the real vocabulary: padding rows are left out
    text = world_text(2)[:120]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text).tolist() and hf_tok.decode(ids) == text
    idx = torch.as_tensor(ids[:64])[None]
    ours = model(idx)[0]
    assert (hf_logits(out, idx) - ours).abs().max().item() < 1e-4
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = idx[:, :8]
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    mine = model.generate(prompt, 30, temperature=0)
    assert torch.equal(mine, theirs) and hf_tok.decode(theirs[0]) == tok.decode(mine[0])
    if gpt2_format:  # a drop-in GPT-2 folder: GPT-2's tokenizer class and <|endoftext|> as BOS and EOS
        eot = tok.vocab_size - 1
        assert saved["eos_token_id"] == saved["bos_token_id"] == eot
        assert type(hf_tok).__name__.startswith("GPT2Tokenizer") and hf_tok.eos_token_id == eot
        assert (out / "merges.txt").read_text().startswith("#version") and (out / "vocab.json").is_file()


def test_char_tokenizer_shares_the_interface(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    text = shakespeare_text[:2000]
    assert tok.token_bytes()[tok.encode(text)].sum() == byte_length(text)
    decoder = tok.stream_decoder()
    assert "".join(decoder.step(i) for i in tok.encode(text)) == text
    assert np.array_equal(tok.encode_batch([text[:1000].encode(), text[1000:]]), tok.encode(text))
    assert tokenizer_from_dict(tok.to_dict()) == tok and tok.kind == "char"
