#!/usr/bin/env bash
# Readies a lent GPU machine's run of benchmarks/gpu_suite.py: that machine has torch, lightning, torchmetrics and
# tensorboard but no network, no jsonargparse (LightningCLI's parser) and no tiny-shakespeare. Run here, in the
# repo root; it fills .whl/ (git-ignored) with pure-Python wheels for Python 3.12 and a copy of the corpus.
#   bash benchmarks/device_prep.sh [path/to/tinyshakespeare.txt]
# Then, on the GPU machine, with .whl carried along (one command, about 9 minutes):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_suite.py --out "$OUT" --corpus .whl/input.txt
set -euo pipefail
cd "$(dirname "$0")/.."
corpus="${1:-../shared/data/tinyshakespeare.txt}"
mkdir -p .whl
rm -f .whl/*.whl
# jsonargparse[signatures] and what it needs beyond the machine's packages (PyYAML and typing-extensions are there)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "jsonargparse==4.53.0" "typeshed_client==2.15.0" "docstring_parser==0.18.0"
install -m 644 "$corpus" .whl/input.txt
echo "sha256 of the corpus: $(sha256sum .whl/input.txt | cut -c1-64)"
ls -l .whl
