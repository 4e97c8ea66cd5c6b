"""sample_speed.py, data_speed.py, checkpoint_speed.py and startup_speed.py run for real on tiny inputs and print their
JSON line (no speed asserted).

They run in this process (as `main(argv)`); data_speed.py, checkpoint_speed.py and startup_speed.py start their own
child processes.
"""

import json
import math

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # model building, corpus encoding and real train.py runs


@pytest.fixture
def benchmarks(monkeypatch, tmp_path):
    """The benchmarks/ scripts importable as when run as scripts; cwd an empty dir."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _rate(x) -> bool:
    return isinstance(x, float) and 0 < x < math.inf


def test_generate_times_sampling_with_and_without_the_kv_cache(benchmarks, capsys):
    import sample_speed

    sample_speed.main(["--configs", "cpu", "--batch_sizes", "1", "2", "--new_tokens", "8", "--device", "cpu",
                   "--threads", "1"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["cpu      batch 1", "cpu      batch 2"]
    last = json.loads(lines[-1])
    # no lecture config asked for: the figure of the first config and batch measured
    assert (last["config"], last["batch"], last["new_tokens"], last["device"], last["threads"]) == ("cpu", 1, 8, "cpu", 1)
    assert _rate(last["cached_tokens_per_s"]) and _rate(last["uncached_tokens_per_s"]) and _rate(last["speedup"])
    assert "compiled_cached_tokens_per_s" not in last  # only with --compile


def test_data_encodes_reloads_and_trains_on_a_generated_corpus(benchmarks, capsys):
    import data_speed

    work = benchmarks / "work"
    work.mkdir()
    data_speed.main(["--sizes_mb", "1", "--steps", "2", "--workdir", str(work)])
    last = _last_json_line(capsys)
    size = last["sizes_mb"]["1"]
    assert size["train_steps"] == 2  # the tiny model trained its steps on the corpus, through the DataModule
    assert _rate(size["encode_mb_per_s"]) and _rate(size["encode_mb_per_cpu_s"]) and size["cache_hit_s"] > 0
    assert size["peak_rss_mb_encode"] > 0 and size["peak_rss_mb_train"] > 0
    # one size: it is both the smallest and the largest corpus
    assert last["encode_mb_per_s"] == size["encode_mb_per_s"] and last["cache_hit_s"] == size["cache_hit_s"]
    assert last["peak_rss_mb_small"] == last["peak_rss_mb_large"] and last["peak_rss_ratio"] == 1.0
    assert not list(work.iterdir())  # corpus and cache deleted


def test_data_with_a_tokenizer_file_times_the_encoding_alone(benchmarks, capsys, shakespeare_path):
    import data_speed

    from nanogpt.tokenizers.bpe import SubwordTokenizer

    text = shakespeare_path.read_text(encoding="utf-8")
    tokenizer = SubwordTokenizer.train([text[:200_000]], vocab_size=512)
    (benchmarks / "tokenizer.json").write_text(tokenizer.tokenizer.to_str(), encoding="utf-8")
    work = benchmarks / "work"
    work.mkdir()
    data_speed.main(["--tokenizer", str(benchmarks / "tokenizer.json"), "--text", str(shakespeare_path), "--sizes_mb", "1",
               "--steps", "2", "--workdir", str(work)])
    last = _last_json_line(capsys)
    size = last["sizes_mb"]["1"]
    assert size["train_steps"] == 2 and _rate(last["bpe_encode_mb_per_s"])
    # the first pass was the encoding alone (no BPE trained): its figures are the encoding's
    assert size["bpe_encode_mb_per_s"] == size["encode_mb_per_s"]
    tokens = len(tokenizer.encode(text))
    assert size["bytes_per_token"] == pytest.approx(len(text.encode("utf-8")) / tokens, rel=0.02)
    assert not list(work.iterdir())


@pytest.mark.timeout(1800)  # three train.py processes, slow to start on a loaded machine
def test_checkpoint_times_save_load_and_an_interrupted_run(benchmarks, capsys):
    import checkpoint_speed

    checkpoint_speed.main(["--repeats", "1", "--resume_steps", "100", "--workdir", str(benchmarks)])
    last = _last_json_line(capsys)
    # the lecture model (10.7M parameters) with AdamW's two moments: about 3 x 43 MB in float32
    assert 100 < last["checkpoint_mb"] < 200
    for key in ("save_atomic_s", "save_plain_torch_s", "load_s", "check_s"):
        assert last[key] >= 0, key
    # the interrupted run was stopped by SIGTERM at its step-50 checkpoint and resumed to step 100 (the benchmark
    # raises if either exit code is wrong)
    assert last["resume_steps"] == 100 and last["straight_s"] > 0 and last["interrupted_plus_resumed_s"] > 0
    assert not list(benchmarks.iterdir())  # its folder deleted


def test_startup_times_sample_help_against_import_torch(benchmarks, capsys):
    import startup_speed

    startup_speed.main(["--rounds", "1"])
    last = _last_json_line(capsys)
    assert last["rounds"] == 1 and [len(v) for v in last["all_s"].values()] == [1, 1]
    assert _rate(last["sample_help_s"]) and _rate(last["import_torch_s"]) and _rate(last["cpu_ratio"])
    assert _rate(last["ratio"])
