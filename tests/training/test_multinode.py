"""Multi-node, as a cluster starts it: two torchrun launches (2 nodes x 1 process) on this machine, over gloo.

Each launch is what one node of a cluster runs (see the README's multi-node section); here both nodes are
127.0.0.1 and share the run dir, as nodes share a file system.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, read_scalars

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(run: Path, cache: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """Starts node 0 and node 1 of a 2-node job at once, as a cluster would, and waits for both."""
    port = free_port()
    env = {**os.environ, "NANOGPT_CACHE": str(cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(REPO / "train.py"), "--config", str(TINY_CONFIG), "--trainer.num_nodes", "2",
             "--trainer.devices", "1", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
             "--trainer.default_root_dir", str(run), "--trainer.val_check_interval", "5",
             "--trainer.log_every_n_steps", "5", "--model.decay_steps", "16", *args],
            cwd=run.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_two_nodes_train_one_run_and_resume_together(tmp_path, nanogpt_cache):
    run = tmp_path / "run"
    for node, result in enumerate(launch_two_nodes(run, nanogpt_cache, "--trainer.max_steps", "10")):
        assert result.returncode == 0, f"node {node}: {result.stderr[-3000:]}"
    ckpts = run / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    assert len(last["rng_states"]) == 2  # one RNG stream per process of the world
    scalars = read_scalars(run)
    assert scalars["batch/world_size"] == [(0, 2.0)]
    assert scalars["batch/global"] == [(0, 16.0)]  # the config's global batch, split over the 2 nodes
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one run dir, one event file: rank 0 writes

    for node, result in enumerate(launch_two_nodes(run, nanogpt_cache, "--trainer.max_steps", "16",
                                                   "--ckpt_path", "last")):
        assert result.returncode == 0, f"node {node} resuming: {result.stderr[-3000:]}"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 16 and len(last["rng_states"]) == 2
    logged = [s for s, _ in read_scalars(run)["train/loss"]]
    assert logged == [4, 9, 14]  # the resumed nodes continued the curve: no gap, no repeated step
    assert [s for s, _ in read_scalars(run)["val/loss"]] == [4, 9, 14]
