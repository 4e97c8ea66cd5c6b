"""End-to-end: the real train.py on real Shakespeare, and every bad input a user can give it."""

import hashlib
import math

import pytest
import torch

from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_script

pytestmark = pytest.mark.slow  # real training processes


def test_training_lowers_val_loss_and_writes_checkpoints_and_events(trained_run):
    scalars = read_scalars(trained_run)
    for tag in ("train/loss", "train/lr", "val/loss", "val/ppl", "val/bpc"):
        assert tag in scalars, sorted(scalars)
    val = scalars["val/loss"]
    assert [s for s, _ in val] == [99, 199, 299]  # every 100 steps, against the optimizer step
    first_train = scalars["train/loss"][0][1]
    assert first_train > 3.5  # starts near ln(65) = 4.17
    assert val[-1][1] < 2.7 and val[-1][1] < math.log(65) - 1.4  # well below its start
    assert val[-1][1] < val[0][1]
    _, last_val = val[-1]
    assert scalars["val/ppl"][-1][1] == pytest.approx(math.exp(last_val), rel=1e-4)
    assert scalars["val/bpc"][-1][1] == pytest.approx(last_val / math.log(2), rel=1e-4)
    assert (trained_run / "config.yaml").is_file()
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 300
    assert len(last["tokenizer"]["chars"]) == 65
    assert last["hyper_parameters"]["vocab_size"] == 65  # linked from the data
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()


def test_final_checkpoint_is_written_between_validations(tmp_path):
    run = tmp_path / "run"
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.max_steps", "130",
                        "--trainer.default_root_dir", run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 130
    # resuming continues the same TensorBoard run dir with no new version directory
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.max_steps", "160",
                        "--trainer.default_root_dir", run, "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 160
    assert not (run / "version_0").exists() and not (run / "lightning_logs").exists()
    steps = [s for s, _ in read_scalars(run)["train/loss"]]
    assert max(steps) == 159 and steps[-1] == 159


def test_default_run_dir_is_named_after_the_config(tmp_path):
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.max_steps", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "tiny" / "checkpoints" / "last.ckpt").is_file()


def test_model_block_size_is_linked_to_the_data(tmp_path):
    # a block size other than the config's: the printed config and the data's blocks follow the model's value
    result = run_script("train.py", "--config", TINY_CONFIG, "--model.block_size", "48", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "block_size: 48" in result.stdout and "block_size: 32" not in result.stdout
    run = tmp_path / "run"
    result = run_script("train.py", "--config", TINY_CONFIG, "--model.block_size", "48", "--trainer.max_steps", "2",
                        "--trainer.default_root_dir", run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["block_size"] == 48
    assert ckpt["callbacks"]["TrainingMonitor"]["tokens_seen"] == 2 * 16 * 48  # 2 steps of 16 blocks of 48


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_run_never_overwrites_a_run_dirs_checkpoints(trained_run, tmp_path):
    before = _sha(trained_run / "checkpoints" / "last.ckpt")
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.default_root_dir", trained_run, cwd=tmp_path)
    assert_user_error(result, "already holds checkpoints", "--ckpt_path last")
    assert _sha(trained_run / "checkpoints" / "last.ckpt") == before


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda p: ["--ckpt_path", p / "nope.ckpt"], ["nope.ckpt", "does not exist"]),
        (lambda p: ["--ckpt_path", "last"], ["no", "last.ckpt"]),
        (lambda p: ["--model.n_embd", "63"], ["n_embd", "divisible", "n_head"]),
        (lambda p: ["--model.n_layers", "3"], ["n_layers"]),
        (lambda p: ["--config", p / "bad_key.yaml"], ["n_layers"]),
        (lambda p: ["--trainer.max_steps", "-1"], ["--trainer.max_steps", "--model.decay_steps"]),
    ],
    # data errors: test_data_cli.py
    ids=["missing-ckpt", "no-last", "n_embd", "unknown-flag", "unknown-config-key", "no-schedule-end"],
)
def test_bad_input_is_one_clear_line(tmp_path, make_args, fragments):
    (tmp_path / "bad_key.yaml").write_text("model:\n  n_layers: 3\n", encoding="utf-8")
    run = tmp_path / "run"
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.default_root_dir", run,
                        *make_args(tmp_path), cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert not (run / "checkpoints").exists()
