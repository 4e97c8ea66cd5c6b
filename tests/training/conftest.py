"""Fixtures shared by the tests of restarts (test_cluster.py, test_slurm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_script
from tests.training.restarts import ARGS, OFFLINE


@pytest.fixture(scope="session")
def uninterrupted_ddp(tmp_path_factory, nanogpt_cache) -> Path:
    """The restart tests' run on 2 DDP processes over gloo, never interrupted: what every restarted job must match
    bit for bit (Lightning starts the 2 processes; SLURM and torchrun start the same ranks)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    result = run_script("train.py", *ARGS, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                        "--trainer.default_root_dir", work / "run", cwd=work,
                        env={"NANOGPT_CACHE": str(nanogpt_cache), **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"
