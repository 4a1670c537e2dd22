#!/usr/bin/env bash
# The trainer benchmark: training steps (forward, backward, clipping, AdamW) on random tokens,
# sequence 512, f32, 2 threads, for the "tiny" shape (hidden 256, intermediate 688, 4 layers,
# 8/4 heads, vocab 8192, micro batch 2) and the "smol" shape (SmolLM2-135M, micro batch 1),
# full fine-tuning and LoRA r=16 on all linear layers, and LoRA again in bf16. axl runs its
# trainer's step (`axl-bench-model train`, `--bf16` as `bf16: true`); with PEER_PYTHON (a
# Python with torch, transformers and peft) the plain PyTorch peer runs the same rows in the
# same run (bench/peer_train.py, bf16 under torch.autocast); with AXOLOTL (an Axolotl 0.21
# `axolotl` executable) Axolotl itself runs tiny LoRA (bench/axolotl_train.sh). Prints tokens/s
# and peak RSS with axl/peer ratios.
#
#   PEER_PYTHON=/venv/bin/python AXOLOTL=/venv/bin/axolotl STEPS=4 REPEAT=3 bash bench/train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
STEPS=${STEPS:-5}
cargo build --release --locked -p axl-bench >&2
REPEAT=${REPEAT:-3}
results=$(mktemp)
# One row: axl and the peer alternate REPEAT times (this machine's speed drifts over minutes),
# and the table takes the median tokens/s and the largest peak RSS of each side. The tiny
# rows run 5× STEPS steps, since their steps are short.
row() { # shape mode [--bf16]
  local steps=$STEPS out
  [ "$1" = tiny ] && steps=$((STEPS * 5))
  for _ in $(seq "$REPEAT"); do
    out=$(target/release/axl-bench-model train --shape "$1" --mode "$2" --steps "$steps" ${3:-})
    echo "axl  $out" >&2
    printf '%s\taxl\t%s\n' "$1 $2${3:+ bf16}" "$out" >> "$results"
    if [ -n "${PEER_PYTHON:-}" ]; then
      out=$("$PEER_PYTHON" bench/peer_train.py --shape "$1" --mode "$2" --steps "$steps" --threads 2 ${3:-} 2>/dev/null)
      echo "peer $out" >&2
      printf '%s\tpeer\t%s\n' "$1 $2${3:+ bf16}" "$out" >> "$results"
    fi
  done
}
row tiny full
row tiny lora
row smol full
row smol lora
# bf16: axl's `bf16: true` (linear layers' products in bf16, f32 sums) against the peer under
# torch.autocast(bfloat16); both need AVX-512 BF16 to gain anything.
row tiny lora --bf16
row smol lora --bf16
if [ -n "${AXOLOTL:-}" ]; then
  axolotl=$(STEPS=$((STEPS * 5)) bash bench/axolotl_train.sh)
  echo "axolotl $axolotl" >&2
  printf '%s\tpeer\t%s\n' "tiny lora (axolotl)" "$axolotl" >> "$results"
fi
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, side, data = line.rstrip("\n").split("\t")
    rows.setdefault(name, {}).setdefault(side, []).append(json.loads(data))
print("\nrow                   axl tok/s   peer tok/s   speed ratio   axl MiB   peer MiB   memory ratio")
for name, sides in rows.items():
    def summary(side):
        runs = sides.get(side)
        if not runs:
            return None, None
        return statistics.median(r["tokens_per_s"] for r in runs), max(r["peak_rss_mib"] for r in runs)
    (a_tps, a_mib), (p_tps, p_mib) = summary("axl"), summary("peer")
    cell = lambda v: "-" if v is None else f"{v:.0f}"
    ratio = lambda a, p: "-" if a is None or p is None else f"{a / p:.2f}x"
    print(f"{name:<20} {cell(a_tps):>10} {cell(p_tps):>12} {ratio(a_tps, p_tps):>13}"
          f" {cell(a_mib):>9} {cell(p_mib):>10} {ratio(a_mib, p_mib):>14}")
PY
