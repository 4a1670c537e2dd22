#!/usr/bin/env bash
# The GPU kernels benchmark: each op of a SmolLM2-135M training step (hidden 576, MLP 1536,
# 9 query and 3 key heads of 64, vocabulary 49152), forward and backward in f32, on 4
# sequences of 2048 tokens: axl's CUDA kernels (`axl-bench-gpu`) side by side with PyTorch's
# eager composition of the same ops (`gpu_peer.py`), median milliseconds and their ratio.
#
#   bash bench/gpu_kernels.sh            # builds axl-bench-gpu with cargo
#   AXL_BENCH_GPU=path/to/axl-bench-gpu bash bench/gpu_kernels.sh   # a binary built elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-8192}
REPEAT=${REPEAT:-20}
bin=${AXL_BENCH_GPU:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p axl-bench --features cuda --bin axl-bench-gpu >&2
  bin=target/release/axl-bench-gpu
fi
axl=$(mktemp)
peer=$(mktemp)
"$bin" --tokens "$TOKENS" --repeat "$REPEAT" | tee "$axl" >&2
python3 bench/gpu_peer.py --tokens "$TOKENS" --repeat "$REPEAT" | tee "$peer" >&2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
python3 - "$axl" "$peer" <<'PY'
import json, sys
axl = {r["op"]: r for r in map(json.loads, open(sys.argv[1]))}
peer = {r["op"]: r for r in map(json.loads, open(sys.argv[2]))}
rows = [
    ("RMSNorm", "rms_norm", "rms_norm"),
    ("SwiGLU", "swiglu", "swiglu"),
    ("RoPE on q and k", "rope_qk", "rope_qk"),
    ("head + loss: fused linear CE vs whole logits", "head_loss_fused_linear", "head_loss_logits"),
    ("head + loss: cut CE (tiles 512×2048) vs whole logits", "head_loss_cut", "head_loss_logits"),
    ("head + loss: cut CE (tiles 4096×4096) vs whole logits", "head_loss_cut_4096_tiles", "head_loss_logits"),
    ("AdamW, 135M parameters (torch foreach)", "adamw_135m", "adamw_135m"),
    ("AdamW, 135M parameters (torch fused=True)", "adamw_135m", "adamw_135m_torch_fused"),
]
print("| op (forward + backward) | axl ms | PyTorch ms | PyTorch / axl |")
print("| --- | ---: | ---: | ---: |")
for name, a, p in rows:
    if a in axl and p in peer:
        x, y = axl[a]["ms"], peer[p]["ms"]
        print(f"| {name} | {x:.3f} | {y:.3f} | {y / x:.2f}× |")
if "head_loss_logits_peak_mib" in peer:
    print(f"\nPyTorch's head + loss adds {peer['head_loss_logits_peak_mib']['mib']:.0f} MiB at its peak.")
PY
