import hashlib

import numpy as np
import pytest
import torch

from nanogpt.data import (
    TINYSHAKESPEARE_SHA256,
    CharDataModule,
    RandomBlocks,
    download_tinyshakespeare,
    read_corpus,
    sample_batch,
    val_block_starts,
)
from nanogpt.errors import NanoGPTError
from tests.conftest import SHAKESPEARE


@pytest.fixture
def tokens():
    return np.arange(10_000, dtype=np.int64) % 251


def test_batches_are_a_pure_function_of_seed_rank_step(tokens):
    a = sample_batch(tokens, 32, 8, seed=1, rank=0, step=5)
    b = sample_batch(tokens, 32, 8, seed=1, rank=0, step=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (8, 32) and a[0].dtype == torch.int64
    # targets are the inputs shifted by one
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])
    other_rank = sample_batch(tokens, 32, 8, seed=1, rank=1, step=5)
    other_step = sample_batch(tokens, 32, 8, seed=1, rank=0, step=6)
    other_seed = sample_batch(tokens, 32, 8, seed=2, rank=0, step=5)
    for other in (other_rank, other_step, other_seed):
        assert not torch.equal(a[0], other[0])


def test_stream_resumes_at_a_step(tokens):
    it = iter(RandomBlocks(tokens, 16, 4, seed=3, rank=0, start_step=0))
    first = [next(it) for _ in range(5)]
    resumed = next(iter(RandomBlocks(tokens, 16, 4, seed=3, rank=0, start_step=3)))
    assert torch.equal(first[3][0], resumed[0])


def test_blocks_stay_inside_the_split():
    tokens = np.arange(40, dtype=np.int64)
    for step in range(200):
        x, y = sample_batch(tokens, 8, 16, seed=0, rank=0, step=step)
        assert y.max().item() <= 39 and x.min().item() >= 0


def test_val_blocks_are_fixed_and_split_across_ranks_without_overlap():
    starts = val_block_starts(5000, 64, 100)
    assert len(starts) == 100 and starts.max() <= 5000 - 65
    assert np.array_equal(starts, val_block_starts(5000, 64, 100))
    parts = [starts[r::3] for r in range(3)]
    assert sum(len(p) for p in parts) == len(starts)
    assert len(np.intersect1d(parts[0], parts[1])) == 0


def test_datamodule_does_no_work_in_init_and_setup_is_idempotent(tmp_path, shakespeare_text):
    dm = CharDataModule(source=str(tmp_path / "missing.txt"))  # no error yet: nothing is read in __init__
    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = CharDataModule(source=str(f), block_size=32, batch_size=4, val_blocks=10, cache_dir=str(tmp_path / "c"))
    assert dm._tokens is None
    dm.setup("fit")
    tokens = dm._tokens
    dm.setup("fit")
    assert dm._tokens is tokens
    assert len(dm.train_tokens) == 18000 and len(dm.val_tokens) == 2000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32)
    val = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in val) == 10
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, dm.val_dataloader()))


def test_directory_of_txt_files(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("second", encoding="utf-8")
    (d / "ignored.md").write_text("nope", encoding="utf-8")
    assert read_corpus(str(d)) == "first\n\nsecond"


def test_default_source_reads_the_seeded_cache(nanogpt_cache):
    assert read_corpus("tinyshakespeare").startswith("First Citizen:")


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", SHAKESPEARE.resolve().as_uri())  # a local file, no network
    path = download_tinyshakespeare(str(tmp_path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256
    assert path == tmp_path / "tinyshakespeare" / "input.txt"


def test_download_failure_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(NanoGPTError, match="--data.source PATH"):
        download_tinyshakespeare(str(tmp_path))
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


def test_download_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_text("not shakespeare", encoding="utf-8")
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", bad.as_uri())
    with pytest.raises(NanoGPTError, match="sha256"):
        download_tinyshakespeare(str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "text, kw, fragment",
    [
        ("", {}, "empty"),
        ("short", {"block_size": 8}, r"fewer than block_size\+1"),
        ("x" * 200, {"block_size": 32, "val_fraction": 0.1}, "validation split"),
    ],
)
def test_bad_data_is_reported(tmp_path, text, kw, fragment):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    dm = CharDataModule(source=str(f), cache_dir=str(tmp_path / "c"), **kw)
    with pytest.raises(NanoGPTError, match=fragment):
        dm.setup()
