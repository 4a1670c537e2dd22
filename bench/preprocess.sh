#!/usr/bin/env bash
# Preprocessing benchmark: `axl preprocess` on 100,000 alpaca rows and 20,000 multi-turn chat
# rows (cold cache), and, when AXOLOTL names an `axolotl` executable (Axolotl 0.21, installed by
# hand in a Python 3.12 virtual environment), `axolotl preprocess` on the same files with the
# same tokenizer in the same run. Prints rows/s (whole command, start to exit) and the ratio.
#
#   bash bench/preprocess.sh
#   AXOLOTL=/path/to/venv/bin/axolotl bash bench/preprocess.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
cargo build --release --locked -p axl -p axl-bench >&2
target/release/axl-bench-preprocess "$WORK" --alpaca "${ALPACA_ROWS:-100000}" --chat "${CHAT_ROWS:-20000}" >&2
declare -A rows=([alpaca]=${ALPACA_ROWS:-100000} [chat]=${CHAT_ROWS:-20000})
seconds() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/last.log" || { cat "$WORK/last.log" >&2; return 1; }; awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { print a / b }'; }
printf '%-8s %10s %14s %16s %8s\n' dataset rows "axl rows/s" "axolotl rows/s" ratio
for name in alpaca chat; do
  rm -rf "$WORK/prepared-$name"
  t_axl=$(seconds target/release/axl preprocess "$WORK/axl-$name.yml")
  axl_rate=$(div "${rows[$name]}" "$t_axl")
  if [ -n "${AXOLOTL:-}" ]; then
    rm -rf "$WORK/prepared-$name"
    t_ax=$(seconds "$AXOLOTL" preprocess "$WORK/axolotl-$name.yml")
    ax_rate=$(div "${rows[$name]}" "$t_ax")
    printf '%-8s %10d %14.0f %16.0f %7.1fx\n' "$name" "${rows[$name]}" "$axl_rate" "$ax_rate" "$(div "$axl_rate" "$ax_rate")"
  else
    printf '%-8s %10d %14.0f %16s %8s\n' "$name" "${rows[$name]}" "$axl_rate" - -
  fi
done
