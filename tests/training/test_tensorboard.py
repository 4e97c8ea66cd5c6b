"""Monitoring: a real run read back through the real TensorBoard server's HTTP API, resumed while it serves."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from nanogpt.generate import sample
from nanogpt.io import load_checkpoint
from nanogpt.model import GPT, GPTConfig
from nanogpt.training.metrics import TrainingMonitor, flops_per_token
from nanogpt.training.progress import StepProgressBar, format_count, format_duration
from nanogpt.errors import NanoGPTError
from tests.conftest import TINY_CONFIG, assert_user_error, read_scalars, run_script

TOKENS_PER_STEP = 16 * 32  # tiny.yaml: batch 16 x block 32, one device, no accumulation
PROMPT, SAMPLE_TOKENS = "ROMEO:", 60
TRAIN_TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen", "train/mfu")
VAL_TAGS = ("val/loss", "val/ppl", "val/bpc", "val/bpb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


class TensorBoard:
    """A client of a running TensorBoard server's HTTP API (the one its web page uses)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return [(step, value) for _, step, value in self.get("/data/plugin/scalars/scalars", tag=tag, run=".")]

    def texts(self, tag: str) -> list[tuple[int, str]]:
        """(step, text) of a text tag; the server renders Markdown to HTML, so tags are stripped and unescaped."""
        rows = self.get("/data/plugin/text/text", tag=tag, run=".")
        return [(row["step"], html.unescape(re.sub(r"<[^>]+>", "", row["text"])).strip("\n")) for row in rows]

    def hparams(self) -> tuple[dict, dict]:
        """The HParams tab's experiment (declared hparams and metrics) and this run's session group."""
        experiment = self.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = self.post(
            "/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_RUNNING"],
             "colParams": [], "startIndex": 0, "sliceSize": 10},
        )
        (group,) = groups["sessionGroups"]
        return experiment, group


@contextmanager
def tensorboard_server(logdir: Path, log: Path) -> Iterator[TensorBoard]:
    """The real `tensorboard` server on 127.0.0.1 at a free port, stopped when the block ends."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(port), "--reload_interval", "1"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        tb = TensorBoard(f"http://127.0.0.1:{port}")
        wait_for(lambda: proc.poll() is None and tb.get("/data/runs"), 90, f"tensorboard to serve ({log.read_text()})")
        yield tb
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train(run: Path, cwd: Path, max_steps: int, *args: str) -> subprocess.CompletedProcess:
    result = run_script(
        "train.py", "--config", TINY_CONFIG, "--trainer.default_root_dir", run, "--trainer.max_steps", max_steps,
        *args, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_flops_per_token() -> int:
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64))
    return flops_per_token(model.config, model.num_params(non_embedding=True))


@pytest.mark.slow
def test_tensorboard_shows_every_tag_and_a_resumed_run_continues_it(tmp_path):
    run = tmp_path / "run"
    monitor_args = [
        "--monitor.sample_prompt", PROMPT, "--monitor.sample_tokens", SAMPLE_TOKENS,
        "--monitor.histogram_every_n_steps", "50", "--trainer.val_check_interval", "50",
        # the CPU twin of a GPU's MFU: a given peak of 1 TFLOP/s instead of one looked up by GPU name
        "--monitor.peak_tflops", "1.0",
        # clip hard: a norm logged after clipping could never exceed 0.1
        "--trainer.gradient_clip_val", "0.1",
        "--quiet",
    ]
    first = train(run, tmp_path, 100, *monitor_args)
    # --quiet: one line per log interval (10) and one per validation (2), no progress bar
    lines = [line for line in first.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 12, first.stdout
    assert lines[0].startswith("step 10/100 | loss ") and " tok/s | mfu " in lines[0] and "| left " in lines[0]
    assert any(line.startswith("step 50/100 | val/loss ") for line in lines)
    assert "step:" not in first.stderr and "it/s" not in first.stderr
    ckpt_100 = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))

    with tensorboard_server(run, tmp_path / "tensorboard.log") as tb:
        assert tb.get("/data/runs") == ["."]  # one run: events straight in the run dir
        tags = set(tb.get("/data/plugin/scalars/tags")["."])
        for tag in TRAIN_TAGS + VAL_TAGS + ("model/num_params", "batch/global",
                                            "hparams/final_val_loss", "hparams/best_val_loss"):
            assert tag in tags, sorted(tags)
        assert "epoch" not in tags  # always 0 in a step-based run; Lightning's copy is dropped

        # the server shows exactly what was logged, and what was logged is right
        events = read_scalars(run)
        for tag in tags:
            served = tb.scalars(tag)
            assert [s for s, _ in served] == [s for s, _ in events[tag]], tag
            assert [v for _, v in served] == pytest.approx([v for _, v in events[tag]]), tag
        log_steps = list(range(9, 100, 10))  # log_every_n_steps 10, against the optimizer step
        for tag in TRAIN_TAGS:
            assert [s for s, _ in tb.scalars(tag)] == log_steps, tag
        assert tb.scalars("train/tokens_seen") == [(s, (s + 1) * TOKENS_PER_STEP) for s in log_steps]
        speeds = dict(tb.scalars("train/tokens_per_sec"))
        assert all(v > 0 and math.isfinite(v) for v in speeds.values())
        for step, mfu in tb.scalars("train/mfu"):
            assert mfu == pytest.approx(tiny_flops_per_token() * speeds[step] / 1e12, rel=1e-4)
        assert all(norm > 0.1 for _, norm in tb.scalars("train/grad_norm"))  # before clipping
        val = tb.scalars("val/loss")
        assert [s for s, _ in val] == [49, 99]
        assert [v for _, v in tb.scalars("val/ppl")] == pytest.approx([math.exp(v) for _, v in val], rel=1e-4)
        assert [v for _, v in tb.scalars("val/bpc")] == pytest.approx([v / math.log(2) for _, v in val], rel=1e-4)
        num_params = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64)).num_params()
        assert tb.scalars("model/num_params") == [(0, num_params)]
        assert tb.scalars("batch/global") == [(0, 16)]

        # the Text tab: the fixed prompt's continuation at each validation, as the model at that step writes it
        texts = tb.texts("val/sample")
        assert [s for s, _ in texts] == [49, 99]
        model, tokenizer = ckpt_100
        expected = sample(model, tokenizer, PROMPT, max_new_tokens=SAMPLE_TOKENS, temperature=0.8, seed=1337)[0]
        def lines(text: str) -> list[str]:  # Markdown keeps the characters, not every space at a line's ends
            return [line.strip() for line in text.strip().splitlines()]

        assert lines(texts[-1][1]) == lines(expected)
        assert texts[0][1].startswith(PROMPT) and texts[0][1] != texts[1][1]

        # the HParams tab: the run's hyperparameters with its final and best val/loss
        experiment, group = tb.hparams()
        declared = {h["name"] for h in experiment["hparamInfos"]}
        assert {"model/n_layer", "model/learning_rate", "data/batch_size", "num_params", "global_batch_size"} <= declared
        assert group["hparams"]["model/n_layer"] == 2 and group["hparams"]["num_params"] == num_params
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metrics["hparams/final_val_loss"] == pytest.approx(val[-1][1])
        assert metrics["hparams/best_val_loss"] == pytest.approx(min(v for _, v in val))

        # optional histograms of weights and gradients
        hist_tags = tb.get("/data/plugin/histograms/tags")["."]
        for name in ("weights/transformer.h.0.attn.c_attn.weight", "grads/transformer.h.0.attn.c_attn.weight"):
            assert name in hist_tags
            assert [row[1] for row in tb.get("/data/plugin/histograms/histograms", tag=name, run=".")] == [49, 99]

        # resume the finished run for 50 more steps while the server watches it
        train(run, tmp_path, 150, "--ckpt_path", "last", *monitor_args)
        wait_for(lambda: tb.scalars("hparams/final_val_loss")[-1][0] == 149, 60, "the resumed run's last step")
        assert tb.get("/data/runs") == ["."]  # the same run, no new version
        assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints"]
        for tag in tb.get("/data/plugin/scalars/tags")["."]:
            steps = [s for s, _ in tb.scalars(tag)]
            assert steps == sorted(set(steps)), f"{tag}: steps repeat or go back: {steps}"
        for tag in TRAIN_TAGS:
            assert [s for s, _ in tb.scalars(tag)] == list(range(9, 150, 10)), tag
        # tokens_seen continues from the checkpointed count
        assert tb.scalars("train/tokens_seen")[-1] == (149, 150 * TOKENS_PER_STEP)
        val = tb.scalars("val/loss")
        assert [s for s, _ in val] == [49, 99, 149]
        assert [s for s, _ in tb.texts("val/sample")] == [49, 99, 149]
        _, group = tb.hparams()
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metrics["hparams/final_val_loss"] == pytest.approx(val[-1][1])
        assert metrics["hparams/best_val_loss"] == pytest.approx(min(v for _, v in val))
        assert [s for s, _ in tb.scalars("hparams/best_val_loss")] == [99, 149]


@pytest.mark.slow
def test_csv_logger_and_progress_bar(tmp_path):
    run = tmp_path / "run"
    # the global batch of 16 in two micro-batches of 8: the monitor counts the global batch, not a micro-batch
    args = ["--logger", "csv", "--trainer.val_check_interval", "20", "--trainer.enable_progress_bar", "true",
            "--data.micro_batch_size", "8"]
    first = train(run, tmp_path, 40, *args)
    # the progress bar counts optimizer steps of max_steps, with loss, last val loss and tokens/s
    bar = first.stdout  # Lightning's tqdm bars write to stdout
    assert "step: 100%" in bar and "40/40" in bar
    for name in ("loss=", "val_loss=", "tok/s="):
        assert name in bar
    assert "mfu=" not in bar  # a CPU with no --monitor.peak_tflops: no MFU rather than a wrong one
    train(run, tmp_path, 60, "--ckpt_path", "last", *args)
    assert not list(run.glob("events.out.tfevents.*"))
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert train_steps == list(range(9, 60, 10))  # continued across the resume, not overwritten
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [19, 39, 59]
    for tag in ("train/grad_norm", "train/tokens_per_sec", "train/tokens_seen", "hparams/final_val_loss"):
        assert any(r[tag] for r in rows), tag
    # the global batch, logged as each session starts: at step 0 and where the resumed session began
    batch = [(int(r["step"]), float(r["batch/global"])) for r in rows if r.get("batch/global")]
    assert batch == [(0, 16), (40, 16)]
    seen = [(int(r["step"]), float(r["train/tokens_seen"])) for r in rows if r["train/tokens_seen"]]
    assert seen == [(s, (s + 1) * TOKENS_PER_STEP) for s in range(9, 60, 10)]  # 2 micro-steps a step, resumed too
    assert "epoch" not in rows[0]


@pytest.mark.slow
def test_a_sample_prompt_outside_the_vocabulary_is_one_clear_line(tmp_path):
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.default_root_dir", tmp_path / "run",
                        "--monitor.sample_prompt", "ROMEO\u00e9:", cwd=tmp_path)
    assert_user_error(result, "monitor.sample_prompt", "vocabulary")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"sample_tokens": -1}, "sample_tokens"), ({"sample_temperature": -0.5}, "sample_temperature"),
     ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"), ({"peak_tflops": 0.0}, "peak_tflops"),
     ({"sample_prompt": ""}, "sample_prompt")],
)
def test_monitor_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(NanoGPTError, match=fragment):
        TrainingMonitor(**kwargs)


def test_bad_monitor_flag_is_one_clear_line(tmp_path):
    result = run_script("train.py", "--config", TINY_CONFIG, "--trainer.default_root_dir", tmp_path / "run",
                        "--monitor.sample_temperature", "-1", cwd=tmp_path)
    assert_user_error(result, "monitor.sample_temperature")


def test_flops_per_token_matches_nanogpts_estimate():
    # nanoGPT's estimate_mfu: 6N + 12 L H Q T, N the parameters without position embeddings
    config = GPTConfig()  # the lecture's model
    n = GPT(config).num_params(non_embedding=True)
    expected = 6 * n + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * config.block_size
    assert flops_per_token(config, n) == expected
    assert 6.0e7 < expected < 8.0e7  # about 64 MFLOP per token for 10.7M parameters


def test_formatting_for_progress_output():
    assert format_count(812) == "812" and format_count(12345) == "12.3k" and format_count(4.56e6) == "4.56M"
    assert format_duration(3725) == "1:02:05"


def test_progress_bar_shows_mfu_only_where_it_is_logged():
    from types import SimpleNamespace

    bar = StepProgressBar()
    logged = {"train/loss": 2.5, "train/tokens_per_sec": 12345.0, "train/mfu": 0.4567, "val/loss": 2.6}
    assert bar.get_metrics(SimpleNamespace(callback_metrics=logged), None) == {
        "loss": "2.5000", "val_loss": "2.6000", "tok/s": "12.3k", "mfu": "45.7%",
    }
    del logged["train/mfu"]  # a CPU, or a GPU whose peak is unknown
    assert "mfu" not in bar.get_metrics(SimpleNamespace(callback_metrics=logged), None)
