#!/usr/bin/env bash
# The trainer benchmark: training steps (forward, backward, clipping, AdamW) on random tokens,
# sequence 512, f32, 2 threads, for the "tiny" shape (hidden 256, intermediate 688, 4 layers,
# 8/4 heads, vocab 8192, micro batch 2) and the "smol" shape (SmolLM2-135M, micro batch 1),
# full fine-tuning and LoRA r=16 on all linear layers. axl runs its trainer's step
# (`axl-bench-model train`); with PEER_PYTHON (a Python with torch, transformers and peft) the
# plain PyTorch peer runs the same rows in the same run (bench/peer_train.py), plus its bf16
# autocast row for smol LoRA; with AXOLOTL (an Axolotl 0.21 `axolotl` executable) Axolotl itself
# runs tiny LoRA (bench/axolotl_train.sh). Prints tokens/s and peak RSS with axl/peer ratios.
#
#   PEER_PYTHON=/venv/bin/python AXOLOTL=/venv/bin/axolotl STEPS=5 bash bench/train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
STEPS=${STEPS:-5}
cargo build --release --locked -p axl-bench >&2
results=$(mktemp)
row() { # shape mode [--bf16]
  local axl peer="{}"
  if [ "${3:-}" = "--bf16" ]; then
    axl="{}"
  else
    axl=$(target/release/axl-bench-model train --shape "$1" --mode "$2" --steps "$STEPS")
    echo "axl  $axl" >&2
  fi
  if [ -n "${PEER_PYTHON:-}" ]; then
    peer=$("$PEER_PYTHON" bench/peer_train.py --shape "$1" --mode "$2" --steps "$STEPS" --threads 2 ${3:-} 2>/dev/null)
    echo "peer $peer" >&2
  fi
  printf '%s\t%s\t%s\n' "$1 $2${3:+ bf16}" "$axl" "$peer" >> "$results"
}
row tiny full
row tiny lora
row smol full
row smol lora
[ -n "${PEER_PYTHON:-}" ] && row smol lora --bf16
if [ -n "${AXOLOTL:-}" ]; then
  axolotl=$(STEPS="$STEPS" bash bench/axolotl_train.sh)
  echo "axolotl $axolotl" >&2
  printf '%s\t%s\t%s\n' "tiny lora (axolotl)" "{}" "$axolotl" >> "$results"
fi
python3 - "$results" <<'PY'
import json, sys
print("\nrow                   axl tok/s   peer tok/s   speed ratio   axl MiB   peer MiB   memory ratio")
for line in open(sys.argv[1]):
    name, a, p = line.rstrip("\n").split("\t")
    a, p = json.loads(a), json.loads(p)
    cell = lambda d, k, f: format(d[k], f) if k in d else "-"
    ratio = lambda k: f"{a[k] / p[k]:.2f}x" if k in a and k in p else "-"
    print(f"{name:<20} {cell(a, 'tokens_per_s', '.0f'):>10} {cell(p, 'tokens_per_s', '.0f'):>12} {ratio('tokens_per_s'):>13}"
          f" {cell(a, 'peak_rss_mib', '.0f'):>9} {cell(p, 'peak_rss_mib', '.0f'):>10} {ratio('peak_rss_mib'):>14}")
PY
