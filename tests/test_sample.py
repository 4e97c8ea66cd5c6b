"""sample.py's command line: checkpoints and run dirs, --top_k, --device, prompts and its one-line errors.

Most run sample.py's main() in this process on an untrained checkpoint (tests/conftest.py random_checkpoint);
the slow ones run the real script on a checkpoint from a real training run.
"""

import shutil

import pytest
import torch

from nanogpt.generate import main, sample
from nanogpt.io import load_checkpoint
from tests.conftest import assert_user_error, run_main, run_script

BASE = ["--prompt", "ROMEO:", "--max_new_tokens", "60"]


def test_top_k_1_is_greedy(random_checkpoint, capsys):
    greedy = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    for seed in ("1", "2"):  # whatever the seed and temperature, only the most likely character is left to draw
        top1 = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--top_k", "1", "--temperature", "1.5",
                        "--seed", seed)
        assert top1.stdout == greedy.stdout
    # and without it, the same seed and temperature draw other characters: --top_k is what made the difference
    sampled = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--temperature", "1.5", "--seed", "1")
    assert sampled.stdout != greedy.stdout


def test_device_cpu_samples_on_the_cpu(random_checkpoint, capsys):
    result = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--seed", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    model, tok = load_checkpoint(str(random_checkpoint), "cpu")
    assert result.stdout == sample(model, tok, "ROMEO:", max_new_tokens=60, seed=3)[0] + "\n"


def test_device_cuda_works_where_there_is_one_and_is_one_line_where_not(random_checkpoint, capsys):
    result = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--seed", "3", "--device", "cuda")
    if torch.cuda.is_available():
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ROMEO:") and len(result.stdout) == len("ROMEO:") + 60 + 1
    else:
        assert_user_error(result, "--device cuda", "no CUDA GPU", "--device cpu")


def test_a_bad_device_is_one_line(random_checkpoint, capsys):
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--device", "gpu"), "--device", "'gpu'")


def test_a_run_dir_without_best_ckpt_samples_its_last_ckpt(random_checkpoint, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(random_checkpoint, tmp_path / "run" / "checkpoints" / "last.ckpt")
    from_dir = run_main(main, capsys, "--ckpt", tmp_path / "run", *BASE, "--seed", "5")
    from_file = run_main(main, capsys, "--ckpt", random_checkpoint, *BASE, "--seed", "5")
    assert from_dir.returncode == 0, from_dir.stderr
    assert from_dir.stdout == from_file.stdout


def test_prompt_file(random_checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("First Citizen:\n", encoding="utf-8")
    result = run_main(main, capsys, "--ckpt", random_checkpoint, "--prompt_file", tmp_path / "p.txt",
                      "--max_new_tokens", "20", "--num_samples", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("---------- sample") == 2 and result.stdout.count("First Citizen:\n") == 2
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--prompt_file", tmp_path / "none.txt"),
                      "none.txt", "does not exist")


def test_unknown_prompt_characters(random_checkpoint, capsys):
    result = run_main(main, capsys, "--ckpt", random_checkpoint, "--prompt", "Hello 😀 ~")
    assert_user_error(result, "'😀'", "'~'", "vocabulary")


def test_missing_or_garbage_checkpoint(tmp_path, capsys):
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "x.ckpt"), "x.ckpt", "does not exist")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path), "holds no")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    assert_user_error(run_main(main, capsys, "--ckpt", bad), "bad.ckpt", "corrupt")


@pytest.mark.slow  # a real training run
def test_sample_py_on_a_trained_run(trained_run, tmp_path):
    args = ["--prompt", "ROMEO:", "--max_new_tokens", "100", "--seed", "7", "--top_k", "20", "--top_p", "0.95"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # see tests/test_generate.py::_one_thread
    result = run_script("sample.py", "--ckpt", trained_run, *args, cwd=tmp_path, env=one_thread)
    assert result.returncode == 0, result.stderr
    text = result.stdout[:-1]  # print() adds one newline
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100
    # the run dir is its best checkpoint; streamed, the same seed prints the same text
    again = run_script("sample.py", "--ckpt", trained_run / "checkpoints" / "best.ckpt", *args, "--stream",
                       cwd=tmp_path, env=one_thread)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout


@pytest.mark.slow
def test_sampling_needs_no_dataset(trained_run, tmp_path):
    result = run_script("sample.py", "--ckpt", trained_run, "--max_new_tokens", "10", cwd=tmp_path,
                        env={"NANOGPT_CACHE": str(tmp_path / "empty_cache")})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "empty_cache").exists()


@pytest.mark.slow
def test_checkpoint_loads_weights_only(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert "state_dict" in ckpt and "tokenizer" in ckpt
