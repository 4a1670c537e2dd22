#!/usr/bin/env bash
# The plugin-hook benchmark: the cost of the loop events of every step (on_step_end, and
# on_log as with logging_steps: 1) with a WebAssembly callback and a native-library callback
# loaded, against the "tiny" LoRA training step (sequence 512, micro batch 2, 2 threads).
# Both callbacks are what `axl plugin new --template callback` writes (they log each step's
# loss and report a metric), built in release. Runs with and without the plugins alternate
# REPEAT times (this machine's speed drifts); prints the time spent in hooks as a share of the
# step, and the step time with plugins over the step time without (medians).
#
#   STEPS=25 REPEAT=3 bash bench/plugins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
STEPS=${STEPS:-25}
REPEAT=${REPEAT:-3}
cargo build --release --locked -p axl -p axl-bench >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/axl plugin new wasm_callback --kind wasm --dir "$work/wasm_callback" >&2
target/release/axl plugin new native_callback --kind dylib --dir "$work/native_callback" >&2
export CARGO_TARGET_DIR=$PWD/target/plugin-crates
(cd "$work/wasm_callback" && cargo build --release --offline --target wasm32-wasip2 >&2)
(cd "$work/native_callback" && cargo build --release --offline >&2)
wasm=$CARGO_TARGET_DIR/wasm32-wasip2/release/wasm_callback.wasm
native=$CARGO_TARGET_DIR/release/libnative_callback.so
unset CARGO_TARGET_DIR
runs=$(mktemp)
for _ in $(seq "$REPEAT"); do
  plain=$(target/release/axl-bench-model train --shape tiny --mode lora --steps "$STEPS")
  with=$(target/release/axl-bench-model train --shape tiny --mode lora --steps "$STEPS" --plugins "$wasm,$native" 2>/dev/null)
  echo "without plugins: $plain" >&2
  echo "with plugins:    $with" >&2
  printf '%s\t%s\n' "$plain" "$with" >> "$runs"
done
python3 - "$runs" <<'PY'
import json, statistics, sys
pairs = [[json.loads(x) for x in line.rstrip("\n").split("\t")] for line in open(sys.argv[1])]
share = statistics.median(w["hook_share_of_step"] for _, w in pairs)
ratio = statistics.median(w["step_s"] / p["step_s"] for p, w in pairs)
hook_ms = statistics.median(w["hook_s_per_step"] for _, w in pairs) * 1e3
print(f"tiny LoRA step, {len(pairs)} alternations: hooks {hook_ms:.3f} ms per step = {100 * share:.3f} % of the step; "
      f"step time with plugins / without: {ratio:.3f}")
PY
rm -f "$runs"
