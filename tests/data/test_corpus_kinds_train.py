"""End-to-end: the real train.py on corpora of other kinds and fine-tuning with a reused vocabulary.

Bad data options are checked in this process, without training, in test_data_cli.py.
"""

import json

import pytest
import torch

from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_script

pytestmark = pytest.mark.slow  # real training processes

SHORT = ["--config", TINY_CONFIG, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6"]


def test_train_on_jsonl_with_a_separate_validation_source_then_fine_tune_with_its_vocabulary(
    tmp_path, shakespeare_text
):
    paragraphs = [p for p in shakespeare_text.split("\n\n") if p]
    rows = [{"text": p, "meta": i} for i, p in enumerate(paragraphs[:1500])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "val.txt").write_text("\n\n".join(paragraphs[1500:1700]), encoding="utf-8")
    run = tmp_path / "run"
    result = run_script("train.py", *SHORT, "--data.source", tmp_path / "train.jsonl",
                        "--data.val_source", tmp_path / "val.txt", "--trainer.default_root_dir", run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    vocab = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["tokenizer"]
    assert "val/loss" in read_scalars(run)

    # new text with characters the model never saw: refused by default, listing them, then replaced
    (tmp_path / "new.txt").write_text("ROMEO: ¿qué? 😀\n" * 400, encoding="utf-8")
    fine = ["--data.source", tmp_path / "new.txt", "--data.vocab", run, "--trainer.default_root_dir", tmp_path / "ft"]
    result = run_script("train.py", *SHORT, *fine, cwd=tmp_path)
    assert_user_error(result, "outside the vocabulary", "'¿' (400)", "'😀' (400)", "--data.oov")
    # fine-tune: the trained weights continue on the new text (6 more steps), unknown characters replaced
    result = run_script("train.py", *SHORT, *fine, "--data.oov", "replace", "--data.oov_replacement", " ",
                        "--ckpt_path", run / "checkpoints" / "last.ckpt", "--trainer.max_steps", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replaced by ' ': '¿' (400)" in result.stderr
    tuned = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["tokenizer"] == vocab and tuned["hyper_parameters"]["vocab_size"] == len(vocab["chars"])
    assert tuned["global_step"] == 12
