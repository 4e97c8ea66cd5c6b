"""train.py's data options as a user gives them, on the command line and in YAML, in this process (no training)."""

import json

import pytest

from nanogpt.training.cli import GPTLightningCLI, main
from tests.conftest import TINY_CONFIG, assert_user_error, run_main

SMALL = ["--model.block_size", "4", "--data.val_blocks", "2"]


def data_of(tmp_path, *args):
    """The data module train.py builds from these arguments (the corpus read and encoded, nothing trained)."""
    cli = GPTLightningCLI(["--config", str(TINY_CONFIG), *SMALL, "--trainer.default_root_dir", str(tmp_path / "run"),
                           "--data.cache_dir", str(tmp_path / "cache"), *map(str, args)])
    dm = cli.datamodule
    return dm, dm.tokenizer.decode(dm.train_tokens), dm.tokenizer.decode(dm.val_tokens)


@pytest.fixture
def hub_folder(tmp_path):
    """A dataset folder as the Hub stores one: two configurations, one with a train and a "heldout" split."""
    root = tmp_path / "hub_dataset"
    files = {"plays/train.jsonl": ["to be", "or not"], "plays/heldout.jsonl": ["that is the question"],
             "poems/train.jsonl": ["roses are red", "violets"]}
    for name, texts in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: plays\n  data_files:\n  - split: train\n    path: plays/train.jsonl\n"
        "  - split: heldout\n    path: plays/heldout.jsonl\n"
        "- config_name: poems\n  data_files:\n  - split: train\n    path: poems/train.jsonl\n---\n",
        encoding="utf-8",
    )
    return root


def test_hf_config_and_hf_val_split_on_the_command_line_and_in_yaml(tmp_path, hub_folder):
    source = f"hf:{hub_folder}"
    dm, train, val = data_of(tmp_path, "--data.source", source, "--data.hf_config", "plays",
                             "--data.val_source", source, "--data.hf_val_split", "heldout")
    assert (train, val) == ("to be\n\nor not", "that is the question")
    assert (dm.corpus.hf_config, dm.corpus.hf_val_split) == ("plays", "heldout")
    config = tmp_path / "poems.yaml"
    config.write_text(f"data:\n  source: {source}\n  hf_config: poems\n  val_source: {source}\n"
                      "  hf_val_split: train\n", encoding="utf-8")
    _, train, val = data_of(tmp_path, "--config", config)
    assert train == val == "roses are red\n\nviolets"


@pytest.mark.parametrize(
    "how, separator, joined",
    [
        ("flag", "\n", "first\nsecond"),  # a real newline, as bash's $'\n' passes it
        ("flag", "\\n", "first\\nsecond"),  # a plain "\n" in a shell is a backslash and an n
        ("flag", "", "firstsecond"),
        ("flag", "<|endoftext|>", "first<|endoftext|>second"),
        ("yaml", '"\\n\\t"', "first\n\tsecond"),  # YAML's double quotes read escapes
        ("yaml", "'\\n'", "first\\nsecond"),  # its single quotes do not
        ("yaml", '""', "firstsecond"),
    ],
)
def test_separator_escapes_on_the_command_line_and_in_yaml(tmp_path, how, separator, joined):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("first", encoding="utf-8")
    (docs / "b.txt").write_text("second", encoding="utf-8")
    if how == "flag":
        args = ["--data.separator", separator]
    else:
        (tmp_path / "sep.yaml").write_text(f"data:\n  separator: {separator}\n", encoding="utf-8")
        args = ["--config", tmp_path / "sep.yaml"]
    dm, train, _ = data_of(tmp_path, "--data.source", docs, "--data.val_source", docs / "a.txt", *args)
    assert train == joined and dm.corpus.separator == joined[5:-6]


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda p: ["--data.source", p / "missing.txt"], ["missing.txt", "does not exist"]),
        (lambda p: ["--data.source", p / "empty.txt"], ["empty.txt is empty"]),
        (lambda p: ["--data.source", p / "short.txt"], ["short.txt has 9 characters", "fewer than block_size+1 = 33"]),
        (lambda p: ["--data.source", p / "small_val.txt"], ["validation split has 30 characters", "val_fraction"]),
        (lambda p: ["--data.source", "hf:nobody-xyz/no-such-dataset"], ["could not load the Hugging Face dataset"]),
        (lambda p: ["--data.vocab", p / "nope.ckpt"], ["--data.vocab", "nope.ckpt does not exist"]),
        (lambda p: ["--data.oov", "ignore"], ["data.oov"]),
        (lambda p: ["--data.oov", "replace"], ["needs one replacement character", "--data.oov_replacement"]),
    ],
    ids=["missing-file", "empty-file", "too-short", "val-too-small", "unknown-hf-dataset", "missing-vocab",
         "bad-oov", "replace-without-character"],
)
def test_bad_data_is_one_line_from_train_py(tmp_path, capsys, make_args, fragments):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    (tmp_path / "small_val.txt").write_text("abcdefghij" * 30, encoding="utf-8")  # 300 chars: val 30 < 33
    run = tmp_path / "run"
    result = run_main(main, capsys, "--config", TINY_CONFIG, "--trainer.default_root_dir", run, *make_args(tmp_path))
    assert_user_error(result, *fragments)
    assert not (run / "checkpoints").exists()
