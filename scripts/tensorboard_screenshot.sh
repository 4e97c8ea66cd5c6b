#!/usr/bin/env bash
# Renders docs/tensorboard.png, the README's picture of TensorBoard showing a real run:
# trains the CPU Shakespeare config (or takes an existing run dir), serves it with the real tensorboard on
# 127.0.0.1 and photographs the page with headless Chromium (Debian: apt-get install -y chromium).
#
#   bash scripts/tensorboard_screenshot.sh [RUN_DIR] [OUT_PNG]
#
# Env: PYTHON (default: python), STEPS (default 2000, the config's own, for a new run), TAG_FILTER (a URL-encoded regex).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
out="${2:-docs/tensorboard.png}"
work="$(mktemp -d)"
tb_pid=""
cleanup() {
    if [ -n "$tb_pid" ]; then kill "$tb_pid" 2>/dev/null || true; wait "$tb_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

run="${1:-}"
if [ -z "$run" ]; then
    run="$work/run"
    "$python" train.py --config configs/shakespeare_char_cpu.yaml --trainer.default_root_dir "$run" \
        --trainer.max_steps "${STEPS:-2000}" --monitor.sample_prompt "ROMEO:" --quiet
fi

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$python" -m tensorboard.main --logdir "$run" --host 127.0.0.1 --port "$port" >"$work/tensorboard.log" 2>&1 &
tb_pid=$!
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" | grep -q 'val/loss' && break
    sleep 0.5
done

# the Time Series dashboard, filtered to our tags; virtual time lets its scripts draw the charts before the shot
mkdir -p "$(dirname "$out")"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$work/chromium" --hide-scrollbars \
    --window-size=1280,760 --virtual-time-budget=30000 --screenshot="$out" \
    "http://127.0.0.1:$port/?darkMode=false#scalars&tagFilter=${TAG_FILTER:-%28train%2Floss%7Cval%2Floss%7Ctrain%2Flr%7Ctrain%2Fgrad_norm%29}" >/dev/null 2>&1
echo "wrote $out ($(du -k "$out" | cut -f1) KiB) from $run"
