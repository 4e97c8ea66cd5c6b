"""nanogpt-eval: the run's own val/loss, any text through the data readers, windows, exports, devices, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt.evaluate import main, sliding_windows
from nanogpt.hf.export import export
from nanogpt.io import load_checkpoint
from tests.conftest import REPO, TINY_CONFIG, assert_user_error, read_scalars, run_main, run_script
from tests.hf.test_pretrained import folders, hf_model, hf_tokenizer, write_hub_cache  # noqa: F401 (fixtures)


def figures(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def text_file(tmp_path, shakespeare_text):
    path = tmp_path / "text.txt"
    path.write_text(shakespeare_text[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, nanogpt_cache):
    """A real train.py run of the tiny config: 30 steps, validated every 10 (on blocks of the held-out tenth)."""
    work = tmp_path_factory.mktemp("short_run")
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.max_steps", 30, "--trainer.val_check_interval",
                        10, "--data.val_blocks", 40, "--trainer.default_root_dir", work / "run", cwd=work,
                        env={"NANOGPT_CACHE": str(nanogpt_cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def test_split_val_gives_the_runs_logged_val_loss(short_run, capsys):
    logged = read_scalars(short_run)["val/loss"]
    assert len(logged) == 3
    last = figures(run_main(main, capsys, "--ckpt", short_run / "checkpoints" / "last.ckpt", "--split", "val"))
    assert abs(last["loss"] - logged[-1][1]) < 1e-5 and last["windows"] == 40
    best = figures(run_main(main, capsys, "--ckpt", short_run, "--split", "val"))  # a run dir: its best.ckpt
    assert abs(best["loss"] - min(v for _, v in logged)) < 1e-5
    assert best["bpc"] == pytest.approx(best["loss"] / math.log(2)) and best["perplexity"] == pytest.approx(
        math.exp(best["loss"]))


def test_non_overlapping_windows_are_the_models_mean_loss(random_checkpoint, text_file, capsys):
    result = run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--max_tokens", 32 * 20 + 1,
                      "--batch_size", 3)
    out = figures(result)
    table = result.stdout.splitlines()[:-1]
    assert [line.split()[0] for line in table] == ["text", "loss", "perplexity", "bpb", "bpc"]
    assert f"{out['perplexity']:.4f}" in table[2]
    model, tok = load_checkpoint(str(random_checkpoint))
    ids = torch.as_tensor(tok.encode(text_file.read_text()[: 32 * 20 + 1]))
    with torch.no_grad():
        _, loss = model(ids[:-1].view(20, 32), ids[1:].view(20, 32))
    assert out["windows"] == 20 and out["tokens"] == 640 and out["bytes"] == 640
    assert abs(out["loss"] - loss.item()) < 1e-5
    assert out["bpb"] == pytest.approx(out["bpc"])  # ASCII text: one byte per character


@pytest.mark.parametrize("n_tokens, block_size, stride", [(100, 8, None), (97, 8, 3), (9, 8, None), (50, 8, 8),
                                                          (50, 8, 1)])
def test_windows_score_every_token_once_with_full_context(n_tokens, block_size, stride):
    w = sliding_windows(n_tokens, block_size, stride)
    scored = np.concatenate([np.arange(s + 1 + f, s + 1 + block_size) for s, f in zip(w.starts, w.first_scored)])
    assert sorted(scored.tolist()) == list(range(1, n_tokens))  # every target once
    assert (w.starts + block_size + 1 <= n_tokens).all() and w.starts[-1] == n_tokens - block_size - 1
    if stride is not None:  # sliding: after the first window, each scored token sees block_size - stride tokens back
        assert (w.first_scored[1:-1] == block_size - stride).all()


def test_stride_changes_the_context_not_the_tokens(random_checkpoint, text_file, capsys):
    plain = figures(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file))
    sliding = figures(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--stride", 8))
    assert plain["tokens"] == sliding["tokens"] == 2999 and sliding["windows"] > 3 * plain["windows"]
    assert sliding["loss"] != plain["loss"]
    again = figures(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--stride", 8))
    assert again == sliding  # deterministic


def test_any_source_the_data_options_read(random_checkpoint, tmp_path, shakespeare_text, capsys):
    docs = [shakespeare_text[i : i + 700] for i in range(0, 2800, 700)]
    (tmp_path / "joined.txt").write_text("\n\n".join(docs), encoding="utf-8")
    with open(tmp_path / "rows.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d, encoding="utf-8")
    common = ["--ckpt", random_checkpoint]
    joined = figures(run_main(main, capsys, *common, "--source", tmp_path / "joined.txt"))
    rows = figures(run_main(main, capsys, *common, "--source", tmp_path / "rows.jsonl", "--text_column", "body"))
    files = figures(run_main(main, capsys, *common, "--source", folder))
    for out in (rows, files):
        assert (out["loss"], out["tokens"], out["bpb"]) == (joined["loss"], joined["tokens"], joined["bpb"])


def test_a_model_and_its_export_give_the_same_figures(random_checkpoint, text_file, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    folder = export(str(random_checkpoint), str(tmp_path / "hf"))
    ours = figures(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file))
    exported = figures(run_main(main, capsys, "--ckpt", folder, "--source", text_file))
    cache = tmp_path / "hub"
    write_hub_cache(cache, "someone/tiny-char", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = figures(run_main(main, capsys, "--ckpt", "hf:someone/tiny-char", "--source", text_file))
    for out in (exported, hub):
        assert (out["loss"], out["bpb"], out["tokens"]) == (ours["loss"], ours["bpb"], ours["tokens"])


def test_a_gpt2_folder_gives_the_loss_transformers_computes(folders, hf_model, hf_tokenizer, text_file,  # noqa: F811
                                                            capsys):
    k, T = 6, 64  # 6 whole windows of GPT-2's context
    out = figures(run_main(main, capsys, "--ckpt", folders["safetensors"], "--source", text_file, "--max_tokens",
                           k * T + 1))
    ids = torch.as_tensor(hf_tokenizer(text_file.read_text())["input_ids"][: k * T + 1])
    with torch.no_grad():
        logits = hf_model(ids[:-1].view(k, T)).logits  # (k, T, vocab)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[1:]).item()
    assert out["windows"] == k and out["tokens"] == k * T and abs(out["loss"] - loss) < 1e-5
    # bits per byte: the bytes of the scored tokens (the text is ASCII, so decoding them gives those bytes)
    assert out["bytes"] == len(hf_tokenizer.decode(ids[1:]).encode("utf-8")) > out["tokens"]
    assert out["bpb"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / out["bytes"])
    assert "bpc" not in out


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_give_the_same_figures_as_one(random_checkpoint, text_file, capsys):
    one = figures(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--batch_size", 4))
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt.evaluate", "--ckpt", str(random_checkpoint), "--source", str(text_file),
         "--batch_size", "4", "--devices", "2", "--device", "cpu"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    two = figures(result)
    assert two.pop("devices") == 2 and one.pop("devices") == 1
    assert two == one


def test_bad_input_is_one_error_line(random_checkpoint, tmp_path, text_file, capsys):
    accents = tmp_path / "accents.txt"
    accents.write_text("Ünïcödé " * 50, encoding="utf-8")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", accents),
                      "outside the model's vocabulary", "'Ü' (50)")
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: hi", encoding="utf-8")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", short),
                      "the text has 9 tokens, fewer than one window (block_size + 1 = 33)")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--block_size", 64),
                      "--block_size 64 is above the model's block_size (32)")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", text_file, "--stride", 40),
                      "--stride must be between 1 and the block size (32)")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint), "pass either --source TEXT")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--split", "val"),
                      "--split val evaluates a run's own data", "config.yaml")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt", "--source", text_file),
                      "does not exist")
    missing = run_main(main, capsys, "--ckpt", random_checkpoint, "--source", tmp_path / "missing.txt")
    assert_user_error(missing, "does not exist", "pass --source tinyshakespeare")  # this command's flag
    assert "--data." not in missing.stderr
    table = tmp_path / "rows.jsonl"
    table.write_text('{"body": "ROMEO: hi"}\n', encoding="utf-8")
    assert_user_error(run_main(main, capsys, "--ckpt", random_checkpoint, "--source", table),
                      "no column 'text'", "--text_column NAME")
