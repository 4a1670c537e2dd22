#!/usr/bin/env bash
# Training benchmark of Axolotl itself, the peer of axl's training benchmark on the "tiny" shape
# (see bench/peer_train.py): `axolotl train` with LoRA r 16 / alpha 32 on all linear layers, CPU,
# f32, sequence 512, micro batch 2, on random token ids, 2 threads. AXOLOTL names an `axolotl`
# executable (Axolotl 0.21, installed by hand in a Python 3.12 virtual environment); its
# environment's Python builds the model, tokenizer, dataset and config (bench/axolotl_train_setup.py).
#
#   AXOLOTL=/path/to/venv/bin/axolotl bash bench/axolotl_train.sh
#   AXOLOTL=... STEPS=3 WORK=/tmp/ax bash bench/axolotl_train.sh
#
# Runs max_steps = STEPS + 1: the first step is an untimed warm-up, like peer_train.py. A plugin
# registered in the config times each step (end of one optimizer step to the end of the next, so
# data loading, logging and Axolotl's callbacks count); tokens_per_s = 2 x 512 / mean step time.
# Loading and saving are not timed. The dataset is prepared by `axolotl preprocess` first, outside
# the measurement (done inside `axolotl train` it spawns two dataset worker processes of ~0.7 GiB
# each); peak RSS is that of the whole `axolotl train` process tree (summed, polled every 50 ms)
# from start to exit; max_process_rss_mib is the largest single process. LAUNCHER=python (the
# default here) trains inside the `axolotl` process; Axolotl's own default, LAUNCHER=accelerate,
# adds the ~0.85 GiB `axolotl` CLI process as the parent of `python -m axolotl.cli.train`.
# Prints one JSON line; the logs stay in $WORK (setup.log, preprocess.log, axolotl.log).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${AXOLOTL:?set AXOLOTL to the axolotl executable of an Axolotl 0.21 environment}"
PY=$(dirname "$AXOLOTL")/python
export PATH="$(dirname "$AXOLOTL"):$PATH"  # LAUNCHER=accelerate execs `accelerate` from PATH
STEPS=${STEPS:-3}
LAUNCHER=${LAUNCHER:-python}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 WANDB_DISABLED=true
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" AXL_BENCH_TIMINGS="$WORK/timings.json"
rm -rf "$WORK/prepared" "$WORK/out" "$AXL_BENCH_TIMINGS"
"$PY" bench/axolotl_train_setup.py prepare "$WORK" --steps "$STEPS" --seq 512 --batch 2 2>"$WORK/setup.log" \
  || { cat "$WORK/setup.log" >&2; exit 1; }
"$AXOLOTL" preprocess "$WORK/axolotl.yml" >"$WORK/preprocess.log" 2>&1 \
  || { tail -n 40 "$WORK/preprocess.log" >&2; exit 1; }
"$PY" bench/axolotl_train_setup.py measure "$WORK/rss.json" -- \
  "$AXOLOTL" train "$WORK/axolotl.yml" --launcher "$LAUNCHER" >"$WORK/axolotl.log" 2>&1 \
  || { tail -n 40 "$WORK/axolotl.log" >&2; exit 1; }
"$PY" - "$WORK" <<'PY'
import json, sys
from importlib.metadata import version
work = sys.argv[1]
t = json.load(open(f"{work}/timings.json"))
rss = json.load(open(f"{work}/rss.json"))
timed = t["step_s"][1:]
step = sum(timed) / len(timed)
final = t["final"]
print(json.dumps({
    "shape": "tiny", "mode": "lora", "bf16": False,
    "peer": f"axolotl {version('axolotl')} (transformers {version('transformers')} + torch {version('torch')} + peft {version('peft')})",
    "tokens_per_s": 2 * 512 / step, "step_s": step, "peak_rss_mib": rss["tree_peak_rss_mib"],
    "max_process_rss_mib": rss["max_process_rss_mib"], "steps": len(timed), "warmup_step_s": t["step_s"][0],
    "train_runtime": final.get("train_runtime"), "train_samples_per_second": final.get("train_samples_per_second"),
    "train_loss": final.get("train_loss"),
}))
PY
