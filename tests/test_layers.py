"""The package's layers: nothing below the training layer imports Lightning, every nanogpt import points down or
sideways, and module-level imports form no cycle; sampling from the command line never loads Lightning."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "nanogpt"
LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")
# The layers, lowest first: a module may import from its own layer and those below. io.load_checkpoint builds the
# tokenizer a checkpoint stores, so io sits just above the tokenizers (still below data, sampling and the rest).
LAYERS = [
    {"nanogpt.errors", "nanogpt.model", "nanogpt.private", "nanogpt.hub"},
    {"nanogpt.tokenizers", "nanogpt"},  # the package itself re-exports the model and the character tokenizer
    {"nanogpt.io"},
    {"nanogpt.generate", "nanogpt.data"},
    {"nanogpt.hf", "nanogpt.evaluate", "nanogpt.app"},
    {"nanogpt.training", "nanogpt.distributed"},  # distributed: the old class path of the FSDP strategy
]
# the only modules below the training layer that may import Lightning: the DataModule is a LightningDataModule
LIGHTNING_ALLOWED = {"nanogpt.data.datamodule"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest layer entry it is or lies under."""
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            under = module.startswith(name + ".") and name != "nanogpt"  # the package is only itself
            if (module == name or under) and len(name) > len(best):
                best, rank = name, i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return rank


def nanogpt_imports(path: Path, known: set[str], top_level_only: bool) -> set[str]:
    """The nanogpt modules path imports (everywhere, or only in statements run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if not top_level_only else iter(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nanogpt")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanogpt":
            for alias in node.names:  # `from nanogpt.data import splits` imports the module nanogpt.data.splits
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def test_every_module_is_in_a_layer_and_imports_down_or_sideways_only():
    known = modules()
    upward = []
    for name, path in known.items():
        for target in nanogpt_imports(path, set(known), top_level_only=False):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_module_level_imports_form_no_cycle():
    known = modules()
    graph = {name: nanogpt_imports(path, set(known), top_level_only=True) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "nanogpt.generate" in graph and graph["nanogpt.evaluate"]  # the graph was really built


def run_python(code: str, *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


REPORT_LIGHTNING = ("import sys, json; mods = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}); "
                    "print('LOADED ' + json.dumps(mods), file=sys.stderr)").format(LIGHTNING=LIGHTNING)


def loaded_lightning(result: subprocess.CompletedProcess) -> list[str]:
    lines = [line for line in result.stderr.splitlines() if line.startswith("LOADED ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return json.loads(lines[0][len("LOADED "):])


def test_no_module_below_the_training_layer_imports_lightning():
    below = [name for name in modules() if layer_of(name) < layer_of("nanogpt.training")
             and name not in LIGHTNING_ALLOWED]
    assert "nanogpt.evaluate" in below and "nanogpt.data.token_cache" in below
    # one fresh interpreter imports them one by one (an interpreter each costs a torch import each): the first
    # module that loads Lightning, itself or through what it imports, is the one named; then, to show that the
    # check can fail, the DataModule, which does load it
    code = ("import importlib, json, sys\n"
            "def lightning():\n"
            f"    return sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r})\n"
            f"for name in {below!r}:\n"
            "    importlib.import_module(name)\n"
            "    if lightning():\n"
            "        break\n"
            "print(json.dumps([name, lightning()]))\n"
            "import nanogpt.data.datamodule\n"
            "print(json.dumps(lightning()))\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    (last, loaded), with_datamodule = map(json.loads, result.stdout.splitlines())
    assert loaded == [], f"importing {last} loads {loaded}"
    assert last == below[-1] and "lightning" in with_datamodule


# sample.py's main as a user runs it (python sample.py ...), reporting at exit, after any SystemExit
RUN_SAMPLE = ("import atexit, runpy, sys\n"
              f"atexit.register(lambda: exec({REPORT_LIGHTNING!r}))\n"
              "sys.argv = ['sample.py'] + sys.argv[1:]\n"
              f"runpy.run_path({str(REPO / 'sample.py')!r}, run_name='__main__')\n")


def test_sample_help_never_imports_lightning():
    result = run_python(RUN_SAMPLE, "--help")
    assert result.returncode == 0 and "--max_new_tokens" in result.stdout, result.stderr
    assert loaded_lightning(result) == []


def test_sampling_a_checkpoint_never_imports_lightning(random_checkpoint):
    result = run_python(RUN_SAMPLE, "--ckpt", str(random_checkpoint), "--max_new_tokens", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len("\n") + 5 + len("\n")  # the default prompt, 5 characters, the newline
    assert loaded_lightning(result) == []
