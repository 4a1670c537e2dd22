#!/usr/bin/env bash
# Runs the model-runtime benchmark (forward pass and KV-cache generation; training is
# bench/train.sh) for axl and, when a Python with torch and transformers is
# given as PEER_PYTHON, for transformers in the same run, and prints the axl/peer ratios.
#
#   bash bench/model_runtime.sh                      # axl only
#   PEER_PYTHON=/path/to/venv/bin/python bash bench/model_runtime.sh
#
# Shape: SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab
# 49152, tied), sequence 512, f32, 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
STEPS=${STEPS:-3}
NEW_TOKENS=${NEW_TOKENS:-256}
cargo build --release --locked -p axl-bench >&2
results=$(mktemp)
for mode in forward generate; do
  axl=$(target/release/axl-bench-model "$mode" --steps "$STEPS" --new-tokens "$NEW_TOKENS")
  echo "axl  $axl"
  if [ -n "${PEER_PYTHON:-}" ]; then
    peer=$("$PEER_PYTHON" bench/peer_transformers.py "$mode" --steps "$STEPS" --new-tokens "$NEW_TOKENS" --threads 2 2>/dev/null)
    echo "peer $peer"
    printf '%s\t%s\n' "$axl" "$peer" >> "$results"
  fi
done
if [ -s "$results" ]; then
  python3 - "$results" <<'PY'
import json, sys
print("\nmode        axl tok/s   peer tok/s   speed ratio   axl MiB   peer MiB   memory ratio")
for line in open(sys.argv[1]):
    a, p = (json.loads(x) for x in line.rstrip("\n").split("\t"))
    print(f"{a['mode']:<11} {a['tokens_per_s']:>9.1f} {p['tokens_per_s']:>12.1f} {a['tokens_per_s']/p['tokens_per_s']:>12.2f}x"
          f" {a['peak_rss_mib']:>9.0f} {p['peak_rss_mib']:>10.0f} {a['peak_rss_mib']/p['peak_rss_mib']:>13.2f}x")
PY
fi
