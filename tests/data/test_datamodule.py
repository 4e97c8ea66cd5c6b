"""The DataModule's loaders, the path training uses: pure batches, ranks that split the global batch, resume."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only

from nanogpt.data.datamodule import TextDataModule
from nanogpt.training.module import GPTModule

N_CHARS = 3000  # distinct characters in increasing code point order: token id == position in the corpus
N_TRAIN = 2700  # val_fraction 0.1 holds out the last 300


@pytest.fixture
def positions_corpus(tmp_path):
    """A corpus whose token ids are their own positions: a block's values say exactly where it was read."""
    f = tmp_path / "positions.txt"
    f.write_text("".join(chr(0x4E00 + i) for i in range(N_CHARS)), encoding="utf-8")
    return f


def datamodule(corpus, tmp_path, rank=0, world=1, **kw):
    """A set-up TextDataModule on one of `world` simulated ranks: a DDP Trainer (nothing launched) given the rank
    through its cluster environment, where trainer.global_rank and trainer.world_size are read from."""
    kw = {"block_size": 16, "batch_size": 12, "val_blocks": 30, "seed": 7, **kw}
    dm = TextDataModule(source=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if world > 1:
        trainer.strategy.cluster_environment.set_world_size(world)
        trainer.strategy.cluster_environment.set_global_rank(rank)
        # set_global_rank also sets Lightning's process-wide rank_zero_only.rank: this test process stays rank 0, or
        # the tests after it would log through dummy loggers
        rank_zero_only.rank = 0
    assert (trainer.global_rank, trainer.world_size) == (rank, world)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def first_batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_the_train_loader_is_a_pure_function_of_seed_rank_and_step(positions_corpus, tmp_path):
    dm = datamodule(positions_corpus, tmp_path)
    assert np.array_equal(dm.train_tokens, np.arange(N_TRAIN))  # ids are positions
    batches = first_batches(dm, 6)
    again = first_batches(datamodule(positions_corpus, tmp_path), 6)  # a new module: the same sequence
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == y.shape == (12, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not any(torch.equal(batches[0][0], x) for x, _ in batches[1:])  # each step draws new blocks
    other_seed = first_batches(datamodule(positions_corpus, tmp_path, seed=8), 1)[0]
    assert not torch.equal(batches[0][0], other_seed[0])


def test_train_blocks_are_contiguous_inside_the_train_split_with_targets_shifted_by_one(positions_corpus, tmp_path):
    dm = datamodule(positions_corpus, tmp_path, batch_size=64)
    assert len(dm.train_tokens) == N_TRAIN
    for x, y in first_batches(dm, 50):  # 3200 blocks: the ends of the split are reached
        assert torch.equal(y, x + 1)  # targets are the next tokens (here: the next positions)
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous: no wrap-around, no gap
        assert x.min() >= 0 and y.max() < N_TRAIN  # never a token of the validation split


def test_three_ranks_split_the_global_batch_without_sharing_rows(positions_corpus, tmp_path):
    steps = 5
    whole = first_batches(datamodule(positions_corpus, tmp_path), steps)  # 1 rank: the global batch of 12
    ranks = [first_batches(datamodule(positions_corpus, tmp_path, rank=r, world=3), steps) for r in range(3)]
    for step in range(steps):
        parts = [ranks[r][step][0] for r in range(3)]
        assert all(p.shape == (4, 16) for p in parts)  # 12 sequences over 3 devices
        # the ranks' rows, in rank order, are the one-device global batch: disjoint, and nothing left out
        assert torch.equal(torch.cat(parts), whole[step][0])
        assert not torch.equal(parts[0], parts[1]) and not torch.equal(parts[1], parts[2])


def test_three_ranks_split_the_validation_blocks_without_overlap(positions_corpus, tmp_path):
    def starts(dm):
        return [int(s) for x, _ in dm.val_dataloader() for s in x[:, 0]]  # a block's first token is its start

    one = starts(datamodule(positions_corpus, tmp_path))
    assert len(one) == 30 and one == starts(datamodule(positions_corpus, tmp_path))  # fixed blocks
    assert min(one) >= N_TRAIN and max(one) + 16 < N_CHARS  # inside the validation split
    parts = [starts(datamodule(positions_corpus, tmp_path, rank=r, world=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(one) and all(parts)  # every block once, on exactly one rank


class _Batches(L.Callback):
    """Records each micro-batch training sees, with the optimizer step it belongs to."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch[0].clone()))


def _fit(dm, tmp_path, max_steps, ckpt_path=None):
    model = GPTModule(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    batches = _Batches()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[batches])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, batches.seen


def test_a_resumed_fit_continues_the_same_batch_sequence(positions_corpus, tmp_path):
    def fresh():  # 2 micro-batches of 4 per optimizer step
        return TextDataModule(source=str(positions_corpus), cache_dir=str(tmp_path / "cache"), block_size=16,
                              batch_size=8, micro_batch_size=4, val_blocks=4, seed=3)

    _, whole = _fit(fresh(), tmp_path / "whole", 4)
    trainer, first = _fit(fresh(), tmp_path / "first", 2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    _, resumed = _fit(fresh(), tmp_path / "resumed", 4, ckpt_path=tmp_path / "step2.ckpt")
    assert [s for s, _ in whole] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s for s, _ in resumed] == [2, 2, 3, 3]
    for (_, a), (_, b) in zip(first + resumed, whole):
        assert torch.equal(a, b)


def test_datamodule_does_no_work_in_init_and_setup_is_idempotent(tmp_path, shakespeare_text):
    TextDataModule(source=str(tmp_path / "missing.txt"))  # no error yet: nothing is read in __init__
    f = tmp_path / "corpus.txt"
    f.write_text(shakespeare_text[:20000], encoding="utf-8")
    dm = TextDataModule(source=str(f), block_size=32, batch_size=4, val_blocks=10, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    tokens = dm.train_tokens
    dm.setup("fit")
    assert dm.train_tokens.base is tokens.base  # the same memory map, not read again
    assert len(dm.train_tokens) == 18000 and len(dm.val_tokens) == 2000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32)
    val = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in val) == 10
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, dm.val_dataloader()))


def test_default_source_reads_the_seeded_cache(nanogpt_cache):
    dm = TextDataModule(block_size=8)  # source tinyshakespeare, cache $NANOGPT_CACHE: no download
    assert dm.tokenizer.decode(dm.train_tokens[:14]) == "First Citizen:" and dm.vocab_size == 65


def test_the_data_and_checkpoint_layers_import_nothing_above_them():
    import subprocess
    import sys

    code = ("import sys, nanogpt.data, nanogpt.data.sources, nanogpt.data.token_cache, nanogpt.data.vocab, nanogpt.io; "
            "print(sorted(m for m in sys.modules if m.startswith('nanogpt.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for above in ("nanogpt.training.cli", "nanogpt.generate", "nanogpt.app", "nanogpt.hf.export", "nanogpt.training.module"):
        assert f"'{above}'" not in loaded, loaded
    assert "'nanogpt.data.token_cache'" in loaded
