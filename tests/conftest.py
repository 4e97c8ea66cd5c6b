"""Shared test fixtures: the corpus (found or fetched once), a seeded data cache, and helpers that run the entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI and developer machines have the corpus beside the checkout
SHARED_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def find_shakespeare(explicit: Optional[str], beside: Path, cache_dir: Optional[str] = None) -> Path:
    """Where the tests read tiny-shakespeare from, first found: explicit ($NANOGPT_TEST_SHAKESPEARE), beside
    (../shared next to the checkout), the package's data cache (cache_dir, else $NANOGPT_CACHE or ~/.cache/nanogpt,
    where the Quickstart's train command put it), else a download into that cache through the package's own
    sha256-checked downloader. Raises LookupError with one line saying where to put the file."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise LookupError(f"NANOGPT_TEST_SHAKESPEARE={explicit} is not a file; point it at tinyshakespeare.txt")
        return path
    if beside.is_file():
        return beside
    from nanogpt.errors import NanoGPTError
    from nanogpt.data.sources import download_tinyshakespeare, tinyshakespeare_path

    try:
        return download_tinyshakespeare(cache_dir)  # a verified copy in the cache, else downloaded and checked
    except NanoGPTError as e:
        why = str(e).split(";")[0]
        raise LookupError(
            f"the tests need tiny-shakespeare and none was found ({why}); put the file at {beside} or "
            f"{tinyshakespeare_path(cache_dir)}, or set NANOGPT_TEST_SHAKESPEARE to its path"
        ) from None


@pytest.fixture(autouse=True)
def process_state_restored():
    """Each test starts from the same process-wide state that a fresh train.py has: a benchmark's main() run in this
    process sets torch's thread count (--threads), and a Trainer built for a simulated rank sets Lightning's
    rank_zero_only.rank. Left changed, a later in-process run computes with other threads (so it is no longer
    bit-identical to a run in a subprocess) or logs as a non-zero rank (nothing reaches the loggers)."""
    import torch
    from lightning_utilities.core.rank_zero import rank_zero_only

    threads, rank = torch.get_num_threads(), getattr(rank_zero_only, "rank", 0)
    yield
    torch.set_num_threads(threads)
    rank_zero_only.rank = rank


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    try:
        return find_shakespeare(os.environ.get("NANOGPT_TEST_SHAKESPEARE"), SHARED_SHAKESPEARE)
    except LookupError as e:
        pytest.exit(str(e), returncode=4)  # one line, and no test runs without the corpus


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def nanogpt_cache(tmp_path_factory, shakespeare_path) -> Path:
    """A data cache seeded with the verified corpus, so the default `tinyshakespeare` source works offline."""
    cache = tmp_path_factory.mktemp("nanogpt_cache")
    (cache / "tinyshakespeare").mkdir()
    shutil.copyfile(shakespeare_path, cache / "tinyshakespeare" / "input.txt")
    return cache


@pytest.fixture(autouse=True)
def _offline_cache(nanogpt_cache, monkeypatch) -> None:
    monkeypatch.setenv("NANOGPT_CACHE", str(nanogpt_cache))
    # were anything to try a download, it would hit a closed loopback port, never the network
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    # Hugging Face libraries: offline, with their cache in the test cache (read when `datasets` is first imported)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(nanogpt_cache / "huggingface"))


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """Runs train.py or sample.py from the repo as a user would, in cwd; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(result, *fragments: str) -> None:
    """A mistake a user can make: non-zero exit, one `error:` line naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def run_main(main, capsys, *argv) -> SimpleNamespace:
    """An entry point's main(argv) run in this process (no interpreter start-up), as a CompletedProcess-like result."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, nanogpt_cache) -> Path:
    """A run dir from a real `train.py` run of the tiny config on Shakespeare (300 steps)."""
    work = tmp_path_factory.mktemp("trained")
    result = run_script(
        "train.py",
        "--config", TINY_CONFIG,
        "--trainer.default_root_dir", work / "run",
        cwd=work,
        env={"NANOGPT_CACHE": str(nanogpt_cache), "NANOGPT_TINYSHAKESPEARE_URL": "http://127.0.0.1:9/input.txt"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in a run dir's TensorBoard event files, as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, shakespeare_text) -> Path:
    """A checkpoint in train.py's format (state_dict, hyper_parameters, tokenizer) of an untrained tiny GPT
    on Shakespeare's characters: for tests of loading, sampling and export that need no training."""
    import torch

    from nanogpt.model import GPT, GPTConfig
    from nanogpt.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer.from_text(shakespeare_text)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config)
    path = tmp_path_factory.mktemp("random_ckpt") / "random.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": config.to_dict(), "tokenizer": tokenizer.to_dict()}, path)
    return path


def run_train(capsys, *argv) -> SimpleNamespace:
    """train.py's main(argv) in this process, as run_main (capsys None: output not captured, stdout/stderr empty).

    A real LightningCLI run without an interpreter start-up; Lightning's seed_everything writes PL_GLOBAL_SEED
    into os.environ, which is put back (as is sys.argv) so later runs in this process start from the same environment.
    """
    from nanogpt.training.cli import main

    env, argv0 = dict(os.environ), sys.argv
    sys.argv = ["train.py"]  # LightningCLI warns when it gets args beside a command line (pytest's)
    try:
        if capsys is not None:
            return run_main(main, capsys, *argv)
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return SimpleNamespace(returncode=code, stdout="", stderr="")
    finally:
        sys.argv = argv0
        os.environ.clear()
        os.environ.update(env)
