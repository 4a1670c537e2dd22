#!/usr/bin/env bash
# The kernels benchmark: what the liger and cut_cross_entropy plugins' kernel choices save, on
# the SmolLM2-135M shape (vocab 49152) at sequence 2048, micro batch 1, LoRA r=16 on all
# linear layers, f32, 2 threads, CPU.
#
# 1. The loss path alone (`axl-bench-model loss`): the frozen head and its cross-entropy,
#    forward and backward, from whole logits (axl's default), fused linear cross-entropy
#    (liger_fused_linear_cross_entropy) and cut cross-entropy; the memory the path adds to
#    the process at its peak, and seconds per pass.
# 2. Whole training steps (`axl-bench-model train`) with the kernels of: every fused op
#    replaced by its reference composition ("reference ops"), axl's defaults with no plugin,
#    liger (all keys), cut_cross_entropy, and liger (rope, norm, activation) with
#    cut_cross_entropy; without and with gradient checkpointing. Peak RSS of the process and
#    tokens/s.
# Rows alternate REPEAT times (this machine's speed drifts); medians of time, largest memory.
#
#   REPEAT=2 STEPS=2 bash bench/kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2
STEPS=${STEPS:-2}
REPEAT=${REPEAT:-2}
cargo build --release --locked -p axl-bench >&2
results=$(mktemp)
for _ in $(seq "$REPEAT"); do
  for kernel in logits fused_linear cut; do
    out=$(target/release/axl-bench-model loss --kernel "$kernel" --seq 2048 --steps 3)
    echo "$out" >&2
    printf 'loss\t%s\t%s\n' "$kernel" "$out" >> "$results"
  done
  for checkpointing in "" --gradient-checkpointing; do
    for kernels in reference default liger cce liger+cce; do
      out=$(target/release/axl-bench-model train --shape smol --mode lora --seq 2048 \
        --steps "$STEPS" --kernels "$kernels" $checkpointing)
      echo "$out" >&2
      printf 'step\t%s%s\t%s\n' "$kernels" "${checkpointing:+ +gc}" "$out" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, name, data = line.rstrip("\n").split("\t")
    rows.setdefault((kind, name), []).append(json.loads(data))
base = rows[("loss", "logits")]
base_mib = max(r["loss_path_mib"] for r in base)
base_s = statistics.median(r["step_s"] for r in base)
print("\nloss path (2048 x 576 -> 49152, frozen head)   MiB    vs logits   s/pass   vs logits")
for (kind, name), runs in rows.items():
    if kind != "loss":
        continue
    mib = max(r["loss_path_mib"] for r in runs)
    s = statistics.median(r["step_s"] for r in runs)
    print(f"{name:46} {mib:7.0f} {base_mib / max(mib, 1):9.1f}x {s:8.2f} {base_s / s:9.2f}x")
print("\ntraining step (smol LoRA r=16, seq 2048)    tokens/s   vs default   peak MiB   vs default   vs no kernels")
for gc in ("", " +gc"):
    ref = rows[("step", "default" + gc)]
    ref_tps = statistics.median(r["tokens_per_s"] for r in ref)
    ref_mib = max(r["peak_rss_mib"] for r in ref)
    none_mib = max(r["peak_rss_mib"] for r in rows[("step", "reference" + gc)])
    for (kind, name), runs in rows.items():
        if kind != "step" or not name.endswith(gc) or (not gc and name.endswith(" +gc")):
            continue
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        mib = max(r["peak_rss_mib"] for r in runs)
        label = {"reference": "reference ops", "default": "default (no plugin)"}.get(name.replace(" +gc", ""), name.replace(" +gc", ""))
        print(f"{label + gc:42} {tps:8.1f} {tps / ref_tps:11.2f}x {mib:10.0f} {1 - mib / ref_mib:10.0%} less {1 - mib / none_mib:10.0%} less")
PY
