#!/usr/bin/env bash
# axl's lm-eval harness against the real lm-evaluation-harness on the same model and tasks:
# the embedded tiny model (examples/tiny-llama) on the example tasks of
# examples/lm_eval_tasks (town_colors zero-shot, multiple choice; town_food two-shot,
# generation). Prints each metric from both and exits non-zero when they differ.
#
# Needs a Python with lm_eval and torch (pip install "lm_eval[hf]" torch):
#   PYTHON=/path/to/venv/bin/python bash bench/lm_eval_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
cargo build --release --locked -p axl >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tasks=$PWD/examples/lm_eval_tasks
model=$PWD/examples/tiny-llama
cat > "$work/config.yml" <<YAML
base_model: $model
plugins:
  - axolotl.integrations.lm_eval.LMEvalPlugin
lm_eval_tasks:
  - town_colors:0
  - town_food:2
lm_eval_include_path: $tasks
lm_eval_batch_size: 8
output_dir: $work/axl
YAML
target/release/axl lm-eval "$work/config.yml" >&2
# lm-eval resolves data files from the working directory.
(cd "$tasks" && for run in "town_colors 0" "town_food 2"; do
  set -- $run
  "$PYTHON" -m lm_eval --model hf --model_args "pretrained=$model,dtype=float32" \
    --device cpu --tasks "$1" --num_fewshot "$2" --include_path "$tasks" \
    --batch_size 8 --output_path "$work/peer/$1" >&2
done)
"$PYTHON" - "$work" <<'PY'
import glob, json, sys
work = sys.argv[1]
def load(pattern):
    out = {}
    for path in glob.glob(pattern, recursive=True):
        for task, values in json.load(open(path))["results"].items():
            out[task] = {k.split(",")[0]: v for k, v in values.items() if k.endswith(",none") and "stderr" not in k}
    return out
axl = load(f"{work}/axl/lm_eval_results/**/results_*.json")
peer = load(f"{work}/peer/**/results_*.json")
same = True
print("| task | metric | axl | lm-eval |")
print("| --- | --- | --- | --- |")
for task in sorted(peer):
    for metric, value in sorted(peer[task].items()):
        mine = axl.get(task, {}).get(metric)
        print(f"| {task} | {metric} | {mine} | {value} |")
        same &= mine is not None and abs(mine - value) < 1e-9
print("same accuracy" if same else "DIFFERENT")
sys.exit(0 if same else 1)
PY
