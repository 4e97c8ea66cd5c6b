"""Corpora: every source kind on small local data, the cache, vocabulary reuse, unicode and bad input."""

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

from nanogpt.data.datamodule import TextDataModule
from nanogpt.data.blocks import sample_rank_batch
from nanogpt.data.token_cache import CorpusConfig, prepare_corpus
from nanogpt.errors import NanoGPTError
from nanogpt.tokenizers.char import CharTokenizer
from nanogpt.data.vocab import load_vocab

UNICODE = "Hé llo 😀 👍🏽 中文字 e\u0301 (e + combining acute)\r\nCRLF line\r\nLF line\n"


def prepare(tmp_path, **kw):
    chunk_chars = kw.pop("chunk_chars", 1 << 22)
    return prepare_corpus(CorpusConfig(**kw), str(tmp_path / "cache"), chunk_chars=chunk_chars)


def text_of(corpus, which="train"):
    return corpus.tokenizer.decode(np.asarray(getattr(corpus, which)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"text": "first doc", "id": 1}, {"text": "", "id": 2}, {"text": None, "id": 3}, {"text": "second 中文", "id": 4}
]
JOINED = "first doc\n\nsecond 中文"  # empty and null rows are skipped: no doubled separator


# ------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("chunk_chars", [7, 1 << 22])  # 7: multi-byte characters straddle chunk boundaries
def test_text_file_round_trips_unicode_exactly(tmp_path, chunk_chars):
    f = tmp_path / "u.txt"
    f.write_bytes((UNICODE * 3).encode("utf-8"))  # write_bytes: CRLF stays CRLF
    corpus = prepare(tmp_path, source=str(f), chunk_chars=chunk_chars)
    assert text_of(corpus) == UNICODE * 3
    chars = corpus.tokenizer.chars
    assert "\r" in chars and "\u0301" in chars and "😀" in chars and "中" in chars  # one code point, one token
    assert len(corpus.train) == len(UNICODE * 3) and corpus.train.dtype == np.uint8


def test_text_that_is_not_utf8_is_reported_with_its_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(NanoGPTError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 7\)"):
        prepare(tmp_path, source=str(f), chunk_chars=3)


def test_directory_is_read_recursively_with_a_glob(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first", encoding="utf-8")
    (d / "empty.txt").write_text("", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("second", encoding="utf-8")
    (d / "notes.md").write_text("markdown", encoding="utf-8")
    write_jsonl(d / "sub" / "rows.jsonl", ROWS)
    assert text_of(prepare(tmp_path, source=str(d))) == "first\n\nsecond"
    assert text_of(prepare(tmp_path, source=str(d), glob="*.md")) == "markdown"
    assert text_of(prepare(tmp_path, source=str(d), glob="*.jsonl")) == JOINED  # each file read by its suffix
    assert text_of(prepare(tmp_path, source=str(d), separator="<|sep|>")) == "first<|sep|>second"
    with pytest.raises(NanoGPTError, match=r"no files matching '\*.csv'.*--data.glob"):
        prepare(tmp_path, source=str(d), glob="*.csv")


def test_jsonl_json_csv_and_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    lines_json = write_jsonl(tmp_path / "lines.json", ROWS)  # JSON lines under a .json name, as datasets allows
    csv = tmp_path / "rows.csv"
    # a quoted field spanning lines, an empty field, and a column that looks numeric
    csv.write_text('id,body\n1,"line one\nline two"\n2,\n3,42\n', encoding="utf-8")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in ROWS], "id": [r["id"] for r in ROWS]}), parquet)
    for f in (jsonl, array, lines_json, parquet):
        assert text_of(prepare(tmp_path, source=str(f))) == JOINED, f
    assert text_of(prepare(tmp_path, source=str(csv), text_column="body")) == "line one\nline two\n\n42"


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet", "saved"])
def test_a_missing_text_column_names_the_available_ones(tmp_path, suffix):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, [{"content": "x", "title": "t"}])
    elif suffix == "csv":
        path.write_text("content,title\nx,t\n", encoding="utf-8")
    elif suffix == "parquet":
        pq.write_table(pa.table({"content": ["x"], "title": ["t"]}), path)
    else:
        datasets.Dataset.from_dict({"content": ["x"], "title": ["t"]}).save_to_disk(str(path))
    with pytest.raises(NanoGPTError, match=r"no column 'text' \(columns: content, title\).*--data.text_column"):
        prepare(tmp_path, source=str(path))


def test_a_non_text_column_is_refused(tmp_path):
    with pytest.raises(NanoGPTError, match="holds int, not text"):
        prepare(tmp_path, source=str(write_jsonl(tmp_path / "r.jsonl", ROWS)), text_column="id")


def test_saved_datasets_are_detected_with_their_splits(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "n": [1, 2, 3]})
    val = datasets.Dataset.from_dict({"text": ["gamma delta"], "n": [4]})
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "dict"))
    assert text_of(prepare(tmp_path, source=str(tmp_path / "one"))) == "alpha\n\nbeta"
    corpus = prepare(tmp_path, source=str(tmp_path / "dict"), val_source=str(tmp_path / "dict"))
    assert text_of(corpus) == "alpha\n\nbeta" and text_of(corpus, "val") == "gamma delta"
    with pytest.raises(NanoGPTError, match=r"no split 'test' \(splits: train, validation\)"):
        prepare(tmp_path, source=str(tmp_path / "dict"), hf_split="test")


def test_hf_source_goes_through_load_dataset_offline(tmp_path):
    # load_dataset on a local dataset folder: the hf: path end to end, without a network
    d = tmp_path / "my_dataset"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": "hub train one"}, {"text": "hub train two"}])
    write_jsonl(d / "validation.jsonl", [{"text": "hub val"}])
    corpus = prepare(tmp_path, source=f"hf:{d}", val_source=f"hf:{d}")
    assert text_of(corpus) == "hub train one\n\nhub train two" and text_of(corpus, "val") == "hub val"
    assert prepare(tmp_path, source=f"hf:{d}", val_source=f"hf:{d}").from_cache


def test_an_unknown_hub_dataset_offline_is_a_clear_error(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: nothing may touch the network
    with pytest.raises(NanoGPTError, match=r"could not load the Hugging Face dataset 'nobody-xyz/no-such-dataset'"):
        prepare(tmp_path, source="hf:nobody-xyz/no-such-dataset")


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("missing.txt", "does not exist"),
        ("hf:", "needs a dataset name"),
        ("bad.csv", "could not be read as CSV"),
        ("bad.jsonl", "line 2 is not valid JSON"),
    ],
)
def test_missing_or_broken_source(tmp_path, source, fragment):
    # an empty or too short source is checked once, through train.py, in test_data_cli.py
    (tmp_path / "bad.csv").write_text('text,n\n"unclosed,1\n', encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    source = source if source.startswith("hf:") else str(tmp_path / source)
    with pytest.raises(NanoGPTError, match=fragment):
        prepare(tmp_path, source=source)


# ------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_and_invalidated_by_a_changed_file_or_option(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 1000, encoding="utf-8")
    first = prepare(tmp_path, source=str(f))
    assert not first.from_cache and isinstance(first.train, np.memmap)
    written = os.stat(first.path / "train.bin")
    again = prepare(tmp_path, source=str(f))
    assert again.from_cache and np.array_equal(again.train, first.train) and again.path == first.path
    reread = os.stat(again.path / "train.bin")  # the very file written first: nothing was encoded again
    assert (reread.st_ino, reread.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    before = os.stat(f)
    f.write_text("hello there\n" * 1000, encoding="utf-8")  # same size, new content
    # a new mtime, whatever the filesystem's timestamp resolution and however fast the two writes came
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    changed = prepare(tmp_path, source=str(f))
    assert not changed.from_cache and text_of(changed) == "hello there\n" * 1000
    assert not first.path.exists()  # the stale version was replaced, not piled up
    other = prepare(tmp_path, source=str(f), separator="|")
    assert not other.from_cache and other.path != changed.path
    assert changed.path.exists()  # a different option is a different corpus: both stay cached


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc" * 100, encoding="utf-8")
    entry = prepare(tmp_path, source=str(f)).path
    with open(entry / "train.bin", "r+b") as fh:
        fh.truncate(10)
    rebuilt = prepare(tmp_path, source=str(f))
    assert not rebuilt.from_cache and len(rebuilt.train) == 300


def test_a_failed_build_leaves_the_previous_entry_and_no_partial_one(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc" * 100, encoding="utf-8")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(CharTokenizer.from_text("abc").to_dict()), encoding="utf-8")
    good = prepare(tmp_path, source=str(f), vocab=str(vocab))
    f.write_text("abcd" * 100, encoding="utf-8")  # now holds a character outside the vocabulary
    with pytest.raises(NanoGPTError, match="outside the vocabulary"):
        prepare(tmp_path, source=str(f), vocab=str(vocab))
    assert (good.path / "train.bin").is_file()
    assert not [p for p in good.path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_two_processes_building_the_same_entry_agree(tmp_path, monkeypatch):
    import nanogpt.data.token_cache as token_cache

    f = tmp_path / "t.txt"
    f.write_text("same corpus\n" * 100, encoding="utf-8")
    real_rename, raced = os.rename, []

    def rename_after_another_build(src, dst):
        if not raced:  # another process (a DDP rank) finishes the same entry just before this one
            raced.append(None)
            raced[0] = prepare(tmp_path, source=str(f))
        return real_rename(src, dst)

    monkeypatch.setattr(token_cache.os, "rename", rename_after_another_build)
    mine = prepare(tmp_path, source=str(f))
    assert raced and mine.path == raced[0].path and text_of(mine) == "same corpus\n" * 100
    assert [p.name for p in mine.path.parent.iterdir()] == [mine.path.name]  # no leftover temporary build


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc" * 100, encoding="utf-8")
    (tmp_path / "not_a_dir").write_text("a file where the cache should go", encoding="utf-8")
    with pytest.raises(NanoGPTError, match=r"could not encode .*t.txt into the cache .*--data.cache_dir"):
        prepare_corpus(CorpusConfig(source=str(f)), str(tmp_path / "not_a_dir"))


# ------------------------------------------------------------------------------------------- vocabulary


@pytest.fixture
def vocab_json(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(CharTokenizer.from_text("abc \n").to_dict()), encoding="utf-8")
    return path


def test_vocab_is_reused_and_unknown_characters_are_listed_with_counts(tmp_path, vocab_json):
    f = tmp_path / "new.txt"
    f.write_text("abc xyx éé😀 cab", encoding="utf-8")
    with pytest.raises(NanoGPTError) as e:
        prepare(tmp_path, source=str(f), vocab=str(vocab_json))
    message = str(e.value)
    for fragment in ("'x' (2)", "'é' (2)", "'y' (1)", "'😀' (1)", "--data.oov drop"):
        assert fragment in message, message


def test_oov_drop_and_replace(tmp_path, vocab_json):
    f = tmp_path / "new.txt"
    f.write_text("abc xyz é cab", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped"):
        dropped = prepare(tmp_path, source=str(f), vocab=str(vocab_json), oov="drop")
    assert text_of(dropped) == "abc   cab" and dropped.tokenizer.chars == sorted("abc \n")
    with pytest.warns(UserWarning, match=r"dropped: 'x' \(1\), 'y' \(1\), 'z' \(1\), 'é' \(1\)"):
        assert prepare(tmp_path, source=str(f), vocab=str(vocab_json), oov="drop").from_cache  # said again
    with pytest.warns(UserWarning, match="replaced"):
        replaced = prepare(tmp_path, source=str(f), vocab=str(vocab_json), oov="replace", oov_replacement="\n")
    assert text_of(replaced) == "abc \n\n\n \n cab"
    with pytest.raises(NanoGPTError, match="not in the vocabulary"):
        prepare(tmp_path, source=str(f), vocab=str(vocab_json), oov="replace", oov_replacement="?")
    with pytest.raises(NanoGPTError, match="needs one replacement character"):
        CorpusConfig(oov="replace")
    with pytest.raises(NanoGPTError, match="data.oov must be one of"):
        CorpusConfig(oov="ignore")


def test_vocab_from_a_checkpoint_or_run_dir(tmp_path):
    tok = CharTokenizer.from_text("hello")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "tokenizer": tok.to_dict()}, run / "checkpoints" / "last.ckpt")
    assert load_vocab(str(run)) == tok
    assert load_vocab(str(run / "checkpoints" / "last.ckpt")) == tok
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(NanoGPTError, match="stores no vocabulary"):
        load_vocab(str(tmp_path / "bare.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(NanoGPTError, match="not a readable checkpoint"):
        load_vocab(str(tmp_path / "junk.ckpt"))
    with pytest.raises(NanoGPTError, match="does not exist"):
        load_vocab(str(tmp_path / "nope.ckpt"))


def test_large_vocabularies_use_wider_token_arrays(tmp_path):
    f = tmp_path / "cjk.txt"
    text = "".join(chr(0x4E00 + i) for i in range(400)) * 2 + "😀"
    f.write_text(text, encoding="utf-8")
    corpus = prepare(tmp_path, source=str(f), chunk_chars=100)
    assert corpus.tokenizer.vocab_size == 401 and corpus.train.dtype == np.uint16
    assert text_of(corpus) == text


def test_streaming_vocabulary_matches_the_whole_text(shakespeare_text):
    chunks = [shakespeare_text[i : i + 1000] for i in range(0, len(shakespeare_text), 1000)] + [UNICODE]
    chunks += [chunk.encode("utf-8") for chunk in chunks[:3]] + [UNICODE.encode("utf-8")]  # UTF-8 bytes too
    assert CharTokenizer.from_chunks(chunks) == CharTokenizer.from_text(shakespeare_text + UNICODE)


def test_fast_encoding_matches_a_plain_lookup(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text + UNICODE)
    for text in (shakespeare_text[:3000], UNICODE):  # the ASCII and the Unicode paths
        expected = [tok.chars.index(c) for c in text]
        assert tok.encode(text).tolist() == expected
        assert tok.encode_known(text.encode("utf-8"))[0].tolist() == expected  # UTF-8 bytes give the same ids


# ------------------------------------------------------------------------------------------- splits and memory


def test_separate_validation_source_shares_the_vocabulary(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("abcdefgh" * 200, encoding="utf-8")
    val.write_text("hgfedcbaz" * 20, encoding="utf-8")  # z appears only here: still in the vocabulary
    dm = TextDataModule(source=str(train), val_source=str(val), block_size=16, batch_size=4, val_blocks=8,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert len(dm.train_tokens) == 1600 and len(dm.val_tokens) == 180 and "z" in dm.tokenizer.chars
    x, y = next(iter(dm.val_dataloader()))
    assert dm.tokenizer.decode(x[0]).startswith("hgfedcbaz")
    small = TextDataModule(source=str(train), val_source=str(val), block_size=200, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(NanoGPTError, match=r"validation source .*val.txt has 180 characters, fewer than block_size"):
        small.setup()


def test_encoding_memory_does_not_grow_with_the_corpus(tmp_path):
    def peak_mb(n_mb):
        f = tmp_path / f"{n_mb}.txt"
        rng = np.random.default_rng(0)
        alphabet = np.frombuffer(b"abcdefghij klmnop\n", dtype=np.uint8)
        f.write_bytes(alphabet[rng.integers(0, len(alphabet), size=n_mb << 20)].tobytes())
        tracemalloc.start()
        prepare(tmp_path, source=str(f), chunk_chars=1 << 18)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return peak

    small, large = peak_mb(2), peak_mb(16)
    assert large < 4 and large < small * 1.3 + 0.5, (small, large)


def test_batches_read_from_the_memory_map(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("0123456789" * 100, encoding="utf-8")
    corpus = prepare(tmp_path, source=str(f))
    x, y = sample_rank_batch(corpus.train, 8, 4, seed=0, rank=0, micro_step=0)
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert all((x[:, 1:] - x[:, :-1]).remainder(10).eq(1).all() for _ in [0])  # consecutive digits


def test_progress_bar_for_large_corpora(tmp_path, capfd):
    f = tmp_path / "t.txt"
    f.write_text("some text\n" * 1000, encoding="utf-8")
    prepare_corpus(CorpusConfig(source=str(f)), str(tmp_path / "a"), progress_min_bytes=1000)
    err = capfd.readouterr().err
    assert "vocabulary" in err and "encoding" in err and "100%" in err
    prepare_corpus(CorpusConfig(source=str(f)), str(tmp_path / "b"))  # 10 kB: below the default 50 MB
    assert "encoding" not in capfd.readouterr().err
