"""The real sample.py on a checkpoint from a real training run."""

import pytest
import torch

from nanogpt.checkpoint import resolve_checkpoint
from nanogpt.generate import load_checkpoint, sample
from tests.conftest import assert_user_error, run_script

pytestmark = pytest.mark.slow  # needs a real training run


def test_sample_prints_prompt_plus_requested_characters(trained_run, tmp_path):
    result = run_script("sample.py", "--ckpt", trained_run, "--prompt", "ROMEO:", "--max_new_tokens", "100",
                        "--seed", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout[:-1]  # print() adds one newline
    assert text.startswith("ROMEO:")
    assert len(text) == len("ROMEO:") + 100
    again = run_script("sample.py", "--ckpt", trained_run / "checkpoints" / "last.ckpt", "--prompt", "ROMEO:",
                       "--max_new_tokens", "100", "--seed", "7", cwd=tmp_path)
    assert again.returncode == 0


def test_same_seed_same_text_and_several_samples(trained_run):
    model, tok = load_checkpoint(str(trained_run))
    a = sample(model, tok, "KING", num_samples=3, max_new_tokens=50, seed=3)
    b = sample(model, tok, "KING", num_samples=3, max_new_tokens=50, seed=3)
    assert a == b and len(a) == 3
    assert all(t.startswith("KING") and len(t) == 54 for t in a)
    assert len(set(a)) > 1  # the batch's rows are sampled independently


def test_run_dir_resolves_to_best_checkpoint(trained_run):
    assert resolve_checkpoint(str(trained_run)).name == "best.ckpt"


def test_sampling_needs_no_dataset(trained_run, tmp_path, monkeypatch):
    result = run_script("sample.py", "--ckpt", trained_run, "--max_new_tokens", "10", cwd=tmp_path,
                        env={"NANOGPT_CACHE": str(tmp_path / "empty_cache")})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "empty_cache").exists()


def test_prompt_file(trained_run, tmp_path):
    (tmp_path / "p.txt").write_text("First Citizen:\n", encoding="utf-8")
    result = run_script("sample.py", "--ckpt", trained_run, "--prompt_file", tmp_path / "p.txt",
                        "--max_new_tokens", "20", "--num_samples", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("First Citizen:\n") == 2


def test_unknown_prompt_characters(trained_run, tmp_path):
    result = run_script("sample.py", "--ckpt", trained_run, "--prompt", "Hello 😀 ~", cwd=tmp_path)
    assert_user_error(result, "'😀'", "'~'", "vocabulary")


def test_missing_checkpoint(tmp_path):
    assert_user_error(run_script("sample.py", "--ckpt", tmp_path / "x.ckpt", cwd=tmp_path), "x.ckpt", "does not exist")
    assert_user_error(run_script("sample.py", "--ckpt", tmp_path, cwd=tmp_path), "holds no")


def test_bad_sampling_values(trained_run, tmp_path):
    assert_user_error(run_script("sample.py", "--ckpt", trained_run, "--temperature", "-1", cwd=tmp_path),
                      "--temperature")
    assert_user_error(run_script("sample.py", "--ckpt", trained_run, "--max_new_tokens", "-5", cwd=tmp_path),
                      "--max_new_tokens")


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    assert_user_error(run_script("sample.py", "--ckpt", bad, cwd=tmp_path), "bad.ckpt", "corrupt")


def test_checkpoint_loads_weights_only(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert "state_dict" in ckpt and "tokenizer" in ckpt
