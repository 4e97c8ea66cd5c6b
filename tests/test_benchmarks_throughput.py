"""The throughput harness runs both sides for real and reports both figures (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.slow  # real training runs, Lightning and plain


def test_harness_prints_both_figures_as_its_last_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--config", str(TINY_CONFIG),
         "--steps", "6", "--warmup", "2", "--repeats", "1", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["ours_tokens_per_s"] > 0 and last["plain_tokens_per_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_tokens_per_s"] / last["plain_tokens_per_s"], rel=1e-3)
    assert last["device"] == "cpu" and last["config"] == str(TINY_CONFIG)
    assert len(last["ours_runs"]) == len(last["plain_runs"]) == 1
    # the same weights, batches and optimizer on both sides: the same loss after the same 8 steps
    assert last["ours_final_loss"] == pytest.approx(last["plain_final_loss"], rel=1e-5)
    assert 2.0 < last["plain_final_loss"] < 4.5
    assert "ours/plain" in result.stdout  # the table
    assert not list(tmp_path.iterdir())  # run dirs were temporary
